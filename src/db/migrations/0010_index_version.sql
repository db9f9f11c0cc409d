CREATE TABLE `index_version` (
	`id` integer PRIMARY KEY NOT NULL,
	`n` integer NOT NULL
);
--> statement-breakpoint
INSERT INTO `index_version` (`id`, `n`) VALUES (1, 0);--> statement-breakpoint
CREATE TRIGGER `index_version_records_added` AFTER INSERT ON `records` BEGIN
	UPDATE `index_version` SET `n` = `n` + 1 WHERE `id` = 1;
END;--> statement-breakpoint
CREATE TRIGGER `index_version_records_removed` AFTER DELETE ON `records` BEGIN
	UPDATE `index_version` SET `n` = `n` + 1 WHERE `id` = 1;
END;--> statement-breakpoint
CREATE TRIGGER `index_version_records_changed` AFTER UPDATE ON `records` BEGIN
	UPDATE `index_version` SET `n` = `n` + 1 WHERE `id` = 1;
END;--> statement-breakpoint
-- Hiding or showing an account, or its handle, changes answers; its status text or a new visible row without a handle does not.
CREATE TRIGGER `index_version_accounts_added` AFTER INSERT ON `accounts` WHEN NEW.`active` = 0 OR NEW.`handle` IS NOT NULL BEGIN
	UPDATE `index_version` SET `n` = `n` + 1 WHERE `id` = 1;
END;--> statement-breakpoint
CREATE TRIGGER `index_version_accounts_changed` AFTER UPDATE OF `active`, `handle` ON `accounts`
	WHEN OLD.`active` IS NOT NEW.`active` OR OLD.`handle` IS NOT NEW.`handle` BEGIN
	UPDATE `index_version` SET `n` = `n` + 1 WHERE `id` = 1;
END;--> statement-breakpoint
CREATE TRIGGER `index_version_accounts_removed` AFTER DELETE ON `accounts` BEGIN
	UPDATE `index_version` SET `n` = `n` + 1 WHERE `id` = 1;
END;
