CREATE TABLE `exchange_jobs` (
	`job_uri` text PRIMARY KEY NOT NULL,
	`job_cid` text NOT NULL,
	`auth_uri` text NOT NULL,
	`auth_cid` text NOT NULL,
	`job_record` text NOT NULL,
	`auth_record` text NOT NULL,
	`requester_did` text NOT NULL,
	`model` text NOT NULL,
	`provider_did` text,
	`machine` text,
	`provider_record_uri` text,
	`attestation_key` text,
	`pro_bono` integer NOT NULL,
	`input_bytes` integer NOT NULL,
	`max_tokens_out` integer NOT NULL,
	`ceiling` integer NOT NULL,
	`hold` integer NOT NULL,
	`reserved` integer NOT NULL,
	`state` text NOT NULL,
	`recorded` integer DEFAULT 0 NOT NULL,
	`reported_in` integer,
	`reported_out` integer,
	`relayed_chunks` integer DEFAULT 0 NOT NULL,
	`relayed_bytes` integer DEFAULT 0 NOT NULL,
	`deadline` text NOT NULL,
	`created_at` text NOT NULL,
	`updated_at` text NOT NULL
);
--> statement-breakpoint
CREATE INDEX `exchange_jobs_state` ON `exchange_jobs` (`state`,`deadline`);--> statement-breakpoint
CREATE INDEX `exchange_jobs_requester` ON `exchange_jobs` (`requester_did`,`created_at`);--> statement-breakpoint
CREATE TABLE `ledger_balances` (
	`account` text PRIMARY KEY NOT NULL,
	`balance` integer DEFAULT 0 NOT NULL,
	`held` integer DEFAULT 0 NOT NULL,
	CONSTRAINT "ledger_balances_held" CHECK("ledger_balances"."held" >= 0),
	CONSTRAINT "ledger_balances_available" CHECK(substr("ledger_balances"."account", 1, 1) = '@' OR "ledger_balances"."balance" - "ledger_balances"."held" >= 0)
);
--> statement-breakpoint
ALTER TABLE `settlements` ADD `job_uri` text;--> statement-breakpoint
CREATE UNIQUE INDEX `settlements_job` ON `settlements` (`job_uri`) WHERE outcome = 'settled';--> statement-breakpoint
INSERT INTO `ledger_balances` (`account`, `balance`) SELECT `account`, SUM(`amount`) FROM `ledger_entries` GROUP BY `account`;--> statement-breakpoint
CREATE TRIGGER `ledger_entries_balance` AFTER INSERT ON `ledger_entries` BEGIN
	INSERT INTO `ledger_balances` (`account`) SELECT NEW.`account` WHERE NOT EXISTS (SELECT 1 FROM `ledger_balances` WHERE `account` = NEW.`account`);
	UPDATE `ledger_balances` SET `balance` = `balance` + NEW.`amount` WHERE `account` = NEW.`account`;
END;--> statement-breakpoint
CREATE TRIGGER `ledger_entries_append_only_update` BEFORE UPDATE ON `ledger_entries` BEGIN
	SELECT RAISE(ABORT, 'ledger entries are append-only');
END;--> statement-breakpoint
CREATE TRIGGER `ledger_entries_append_only_delete` BEFORE DELETE ON `ledger_entries` BEGIN
	SELECT RAISE(ABORT, 'ledger entries are append-only');
END;
