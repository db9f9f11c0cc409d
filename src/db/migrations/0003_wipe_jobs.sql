CREATE TABLE `wipe_jobs` (
	`id` text PRIMARY KEY NOT NULL,
	`did` text NOT NULL,
	`status` text NOT NULL,
	`phase` text NOT NULL,
	`report` text NOT NULL,
	`created_at` text NOT NULL,
	`updated_at` text NOT NULL
);
--> statement-breakpoint
CREATE INDEX `wipe_jobs_did` ON `wipe_jobs` (`did`);