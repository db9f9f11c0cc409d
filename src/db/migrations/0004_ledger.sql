CREATE TABLE `exchange_outbox` (
	`ref` text PRIMARY KEY NOT NULL,
	`collection` text NOT NULL,
	`rkey` text NOT NULL,
	`record` text NOT NULL,
	`status` text NOT NULL,
	`attempts` integer DEFAULT 0 NOT NULL,
	`next_attempt_at` text NOT NULL,
	`last_error` text,
	`uri` text,
	`cid` text,
	`created_at` text NOT NULL,
	`published_at` text
);
--> statement-breakpoint
CREATE INDEX `exchange_outbox_pending` ON `exchange_outbox` (`status`,`next_attempt_at`);--> statement-breakpoint
CREATE TABLE `exchange_state` (
	`key` text PRIMARY KEY NOT NULL,
	`value` text NOT NULL
);
--> statement-breakpoint
CREATE TABLE `ledger_entries` (
	`id` integer PRIMARY KEY AUTOINCREMENT NOT NULL,
	`txn_id` integer NOT NULL,
	`account` text NOT NULL,
	`amount` integer NOT NULL,
	FOREIGN KEY (`txn_id`) REFERENCES `ledger_txns`(`id`) ON UPDATE no action ON DELETE no action
);
--> statement-breakpoint
CREATE INDEX `ledger_entries_account` ON `ledger_entries` (`account`,`id`);--> statement-breakpoint
CREATE INDEX `ledger_entries_txn` ON `ledger_entries` (`txn_id`);--> statement-breakpoint
CREATE TABLE `ledger_txns` (
	`id` integer PRIMARY KEY AUTOINCREMENT NOT NULL,
	`kind` text NOT NULL,
	`ref` text NOT NULL,
	`meta` text,
	`created_at` text NOT NULL
);
--> statement-breakpoint
CREATE UNIQUE INDEX `ledger_txns_ref_unique` ON `ledger_txns` (`ref`);--> statement-breakpoint
CREATE TABLE `settlements` (
	`receipt_uri` text PRIMARY KEY NOT NULL,
	`receipt_cid` text NOT NULL,
	`requester_did` text NOT NULL,
	`provider_did` text NOT NULL,
	`authorization_key` text,
	`outcome` text NOT NULL,
	`amount` integer DEFAULT 0 NOT NULL,
	`fee` integer DEFAULT 0 NOT NULL,
	`finding_code` text,
	`finding_message` text,
	`outbox_ref` text,
	`decided_at` text NOT NULL
);
--> statement-breakpoint
CREATE UNIQUE INDEX `settlements_authorization` ON `settlements` (`authorization_key`) WHERE outcome = 'settled';--> statement-breakpoint
CREATE INDEX `settlements_requester` ON `settlements` (`requester_did`);--> statement-breakpoint
CREATE INDEX `settlements_provider` ON `settlements` (`provider_did`);