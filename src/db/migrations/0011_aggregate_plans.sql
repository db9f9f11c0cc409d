-- With planner statistics, SQLite took an account's first and last record of a collection, and a friend
-- pair's first record, from records_edges (collection, did, subject_did): a pass over every record of the
-- account in that collection (413 ms for the exchange's 305,000 settlements). records_did_collection
-- (did, collection, sort_at, uri) answers each with one step, or a few rows.
DROP TRIGGER `facts_accounts_removed`;--> statement-breakpoint
CREATE TRIGGER `facts_accounts_removed` INSTEAD OF INSERT ON `record_facts` WHEN NEW.`sign` = -1 BEGIN
	UPDATE `account_collections` SET `n` = `n` - 1 WHERE `did` = NEW.`did` AND `collection` = NEW.`collection`;
	DELETE FROM `account_collections` WHERE `did` = NEW.`did` AND `collection` = NEW.`collection` AND `n` = 0;
	UPDATE `account_collections` SET
			`first_at` = COALESCE((SELECT MIN(`sort_at`) FROM `records` INDEXED BY `records_did_collection` WHERE `did` = NEW.`did` AND `collection` = NEW.`collection` AND `sort_at` > ''), ''),
			`last_at` = COALESCE((SELECT MAX(`sort_at`) FROM `records` INDEXED BY `records_did_collection` WHERE `did` = NEW.`did` AND `collection` = NEW.`collection`), '')
		WHERE `did` = NEW.`did` AND `collection` = NEW.`collection` AND NEW.`sort_at` IN (`first_at`, `last_at`);
	UPDATE `account_stats` SET `records` = `records` - 1,
			`jobs` = `jobs` - (NEW.`collection` = 'dev.cocore.compute.job'),
			`receipts` = `receipts` - (NEW.`collection` = 'dev.cocore.compute.receipt'),
			`machines` = `machines` - (NEW.`collection` = 'dev.cocore.compute.provider'),
			`tokens` = `tokens` - NEW.`tokens`
		WHERE `did` = NEW.`did`;
	DELETE FROM `account_stats` WHERE `did` = NEW.`did` AND `records` = 0;
	UPDATE `account_stats` SET
			`joined_at` = (SELECT COALESCE(MIN(NULLIF(`first_at`, '')), '') FROM `account_collections` WHERE `did` = NEW.`did`),
			`last_at` = (SELECT COALESCE(MAX(`last_at`), '') FROM `account_collections` WHERE `did` = NEW.`did`)
		WHERE `did` = NEW.`did` AND NEW.`sort_at` IN (`joined_at`, `last_at`);
END;--> statement-breakpoint
DROP TRIGGER `facts_friend_edges_removed`;--> statement-breakpoint
CREATE TRIGGER `facts_friend_edges_removed` INSTEAD OF INSERT ON `record_facts`
	WHEN NEW.`sign` = -1 AND NEW.`collection` = 'dev.cocore.account.friend' AND NEW.`subject` IS NOT NULL BEGIN
	UPDATE `friend_edges` SET `n` = `n` - 1 WHERE `friender` = NEW.`did` AND `subject` = NEW.`subject`;
	DELETE FROM `friend_edges` WHERE `friender` = NEW.`did` AND `subject` = NEW.`subject` AND `n` = 0;
	UPDATE `friend_edges` SET (`first_at`, `first_uri`, `created_at`) = (
			SELECT `sort_at`, `uri`, CASE WHEN json_type(`body`, '$.createdAt') = 'text' THEN json_extract(`body`, '$.createdAt') END
			FROM `records` INDEXED BY `records_did_collection` WHERE `did` = NEW.`did` AND `collection` = 'dev.cocore.account.friend' AND `subject_did` = NEW.`subject`
			ORDER BY `sort_at`, `uri` LIMIT 1)
		WHERE `friender` = NEW.`did` AND `subject` = NEW.`subject` AND `first_uri` = NEW.`uri`;
END;
