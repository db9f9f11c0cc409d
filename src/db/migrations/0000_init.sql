CREATE TABLE `accounts` (
	`did` text PRIMARY KEY NOT NULL,
	`handle` text,
	`active` integer DEFAULT true NOT NULL,
	`status` text
);
--> statement-breakpoint
CREATE INDEX `accounts_hidden` ON `accounts` (`did`) WHERE "accounts"."active" = 0;--> statement-breakpoint
CREATE TABLE `cursors` (
	`source` text PRIMARY KEY NOT NULL,
	`seq` integer NOT NULL
);
--> statement-breakpoint
CREATE TABLE `records` (
	`uri` text PRIMARY KEY NOT NULL,
	`did` text NOT NULL,
	`collection` text NOT NULL,
	`rkey` text NOT NULL,
	`cid` text NOT NULL,
	`body` text NOT NULL,
	`sort_at` text NOT NULL,
	`indexed_at` text NOT NULL,
	`provider_did` text,
	`requester_did` text,
	`exchange_did` text,
	`subject_did` text,
	`job_uri` text,
	`receipt_uri` text,
	`attestation_uri` text,
	`authorization_uri` text,
	`model` text
);
--> statement-breakpoint
CREATE INDEX `records_collection_sort` ON `records` (`collection`,`sort_at`,`uri`);--> statement-breakpoint
CREATE INDEX `records_did_collection` ON `records` (`did`,`collection`,`sort_at`,`uri`);--> statement-breakpoint
CREATE INDEX `records_requester` ON `records` (`collection`,`requester_did`,`sort_at`,`uri`);--> statement-breakpoint
CREATE INDEX `records_provider` ON `records` (`collection`,`provider_did`,`sort_at`,`uri`);--> statement-breakpoint
CREATE INDEX `records_subject` ON `records` (`collection`,`subject_did`,`sort_at`,`uri`);--> statement-breakpoint
CREATE INDEX `records_exchange` ON `records` (`collection`,`exchange_did`,`sort_at`,`uri`);--> statement-breakpoint
CREATE INDEX `records_job` ON `records` (`job_uri`);--> statement-breakpoint
CREATE INDEX `records_receipt` ON `records` (`receipt_uri`);--> statement-breakpoint
CREATE INDEX `records_attestation` ON `records` (`attestation_uri`);--> statement-breakpoint
CREATE INDEX `records_model` ON `records` (`collection`,`model`);--> statement-breakpoint
CREATE INDEX `records_edges` ON `records` (`collection`,`did`,`subject_did`);--> statement-breakpoint
CREATE TABLE `rejections` (
	`reason` text NOT NULL,
	`collection` text DEFAULT '' NOT NULL,
	`count` integer DEFAULT 0 NOT NULL,
	`last_uri` text,
	`last_at` text DEFAULT CURRENT_TIMESTAMP NOT NULL,
	PRIMARY KEY(`reason`, `collection`)
);
--> statement-breakpoint
CREATE TABLE `repos` (
	`did` text PRIMARY KEY NOT NULL,
	`rev` text NOT NULL,
	`needs_resync` integer DEFAULT false NOT NULL
);
