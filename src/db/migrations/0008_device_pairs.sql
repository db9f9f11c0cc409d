CREATE TABLE `device_pairs` (
	`device_hash` text PRIMARY KEY NOT NULL,
	`code_hash` text,
	`status` text NOT NULL,
	`did` text,
	`key_id` text,
	`sealed_session` text,
	`created_at` text NOT NULL,
	`expires_at` text NOT NULL
);
--> statement-breakpoint
CREATE UNIQUE INDEX `device_pairs_code_hash_unique` ON `device_pairs` (`code_hash`);--> statement-breakpoint
CREATE INDEX `device_pairs_expires` ON `device_pairs` (`expires_at`);