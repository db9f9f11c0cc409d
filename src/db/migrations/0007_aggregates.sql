CREATE TABLE `account_collections` (
	`did` text NOT NULL,
	`collection` text NOT NULL,
	`n` integer NOT NULL,
	`first_at` text NOT NULL,
	`last_at` text NOT NULL,
	PRIMARY KEY(`did`, `collection`)
);
--> statement-breakpoint
CREATE TABLE `account_stats` (
	`did` text PRIMARY KEY NOT NULL,
	`records` integer NOT NULL,
	`jobs` integer NOT NULL,
	`receipts` integer NOT NULL,
	`machines` integer NOT NULL,
	`tokens` integer NOT NULL,
	`joined_at` text NOT NULL,
	`last_at` text NOT NULL,
	`hidden` integer NOT NULL,
	`handle` text
);
--> statement-breakpoint
CREATE INDEX `account_stats_recent` ON `account_stats` ("last_at" DESC,`did`) WHERE "account_stats"."hidden" = 0;--> statement-breakpoint
CREATE INDEX `account_stats_newest` ON `account_stats` ("joined_at" DESC,`did`) WHERE "account_stats"."hidden" = 0;--> statement-breakpoint
CREATE INDEX `account_stats_providers` ON `account_stats` ("last_at" DESC,`did`) WHERE "account_stats"."hidden" = 0 AND "account_stats"."machines" > 0;--> statement-breakpoint
CREATE TABLE `account_weeks` (
	`did` text NOT NULL,
	`week` text NOT NULL,
	`jobs` integer DEFAULT 0 NOT NULL,
	`receipts` integer DEFAULT 0 NOT NULL,
	`tokens` integer DEFAULT 0 NOT NULL,
	`machines` integer DEFAULT 0 NOT NULL,
	`trusted` integer DEFAULT 0 NOT NULL,
	PRIMARY KEY(`did`, `week`)
);
--> statement-breakpoint
CREATE TABLE `activity_windows` (
	`name` text PRIMARY KEY NOT NULL,
	`at` text NOT NULL
);
--> statement-breakpoint
CREATE TABLE `friend_counts` (
	`subject` text PRIMARY KEY NOT NULL,
	`n` integer NOT NULL
);
--> statement-breakpoint
CREATE TABLE `friend_edges` (
	`friender` text NOT NULL,
	`subject` text NOT NULL,
	`n` integer NOT NULL,
	`first_at` text NOT NULL,
	`first_uri` text NOT NULL,
	`created_at` text,
	`friender_hidden` integer NOT NULL,
	`subject_hidden` integer NOT NULL,
	PRIMARY KEY(`friender`, `subject`)
);
--> statement-breakpoint
CREATE INDEX `friend_edges_listed` ON `friend_edges` (`friender`,`subject`) WHERE "friend_edges"."friender_hidden" = 0 AND "friend_edges"."subject_hidden" = 0 AND "friend_edges"."friender" <> "friend_edges"."subject";--> statement-breakpoint
CREATE INDEX `friend_edges_incoming` ON `friend_edges` (`subject`,`friender_hidden`,"first_at" DESC,`friender`);--> statement-breakpoint
CREATE TABLE `index_counts` (
	`name` text PRIMARY KEY NOT NULL,
	`n` integer NOT NULL
);
--> statement-breakpoint
CREATE TABLE `latency_hist` (
	`kind` text NOT NULL,
	`key` text NOT NULL,
	`bucket` integer NOT NULL,
	`n` integer NOT NULL,
	PRIMARY KEY(`kind`, `key`, `bucket`)
);
--> statement-breakpoint
CREATE TABLE `latency_samples` (
	`uri` text PRIMARY KEY NOT NULL,
	`provider` text NOT NULL,
	`model` text,
	`sort_at` text NOT NULL,
	`ms` integer NOT NULL,
	`bucket` integer NOT NULL
);
--> statement-breakpoint
CREATE INDEX `latency_samples_time` ON `latency_samples` (`sort_at`,`uri`);--> statement-breakpoint
CREATE INDEX `latency_samples_provider` ON `latency_samples` (`provider`,`sort_at`,`uri`);--> statement-breakpoint
CREATE INDEX `latency_samples_model` ON `latency_samples` (`model`,`sort_at`,`uri`);--> statement-breakpoint
CREATE TABLE `latency_stats` (
	`kind` text NOT NULL,
	`key` text NOT NULL,
	`n` integer NOT NULL,
	`sum` integer NOT NULL,
	`p50` integer NOT NULL,
	`below50` integer NOT NULL,
	`p95` integer NOT NULL,
	`below95` integer NOT NULL,
	`last_at` text NOT NULL,
	`last_uri` text NOT NULL,
	`last_ms` integer NOT NULL,
	PRIMARY KEY(`kind`, `key`)
);
--> statement-breakpoint
CREATE TABLE `model_activity` (
	`model` text NOT NULL,
	`provider` text NOT NULL,
	`requests` integer NOT NULL,
	`tokens` integer NOT NULL,
	`hour_requests` integer NOT NULL,
	`hour_tokens` integer NOT NULL,
	`day_requests` integer NOT NULL,
	`day_tokens` integer NOT NULL,
	`week_requests` integer NOT NULL,
	`week_tokens` integer NOT NULL,
	`month_requests` integer NOT NULL,
	`month_tokens` integer NOT NULL,
	PRIMARY KEY(`model`, `provider`)
);
--> statement-breakpoint
CREATE TABLE `model_machines` (
	`model` text NOT NULL,
	`did` text NOT NULL,
	`machines` integer NOT NULL,
	PRIMARY KEY(`model`, `did`)
);
--> statement-breakpoint
CREATE INDEX `friend_edges_subject` ON `friend_edges` (`subject`);--> statement-breakpoint
INSERT INTO `activity_windows` (`name`, `at`) VALUES
	('hour', strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-1 hour')),
	('day', strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-1 day')),
	('week', strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-7 days')),
	('month', strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-30 days'));--> statement-breakpoint
-- A receipt's latency: completedAt - startedAt in whole ms, times read as JavaScript's Date.parse reads them
-- (fractions of a millisecond cut, not rounded); NULL unless both are RFC 3339 strings. `bucket`: the value to
-- three significant digits (exact below 1 s, within 0.5% above), the latency histogram's key.
CREATE VIEW `receipt_samples` AS
SELECT `uri`, `provider`, `model`, `sort_at`, `ms`,
	CASE WHEN `ms` < 1000 THEN `ms`
		WHEN `ms` < 10000 THEN (`ms` + 5) / 10 * 10
		WHEN `ms` < 100000 THEN (`ms` + 50) / 100 * 100
		WHEN `ms` < 1000000 THEN (`ms` + 500) / 1000 * 1000
		WHEN `ms` < 10000000 THEN (`ms` + 5000) / 10000 * 10000
		WHEN `ms` < 100000000 THEN (`ms` + 50000) / 100000 * 100000
		WHEN `ms` < 1000000000 THEN (`ms` + 500000) / 1000000 * 1000000
		WHEN `ms` < 10000000000 THEN (`ms` + 5000000) / 10000000 * 10000000
		WHEN `ms` < 100000000000 THEN (`ms` + 50000000) / 100000000 * 100000000
		WHEN `ms` < 1000000000000 THEN (`ms` + 500000000) / 1000000000 * 1000000000
		WHEN `ms` < 10000000000000 THEN (`ms` + 5000000000) / 10000000000 * 10000000000
		WHEN `ms` < 100000000000000 THEN (`ms` + 50000000000) / 100000000000 * 100000000000
		ELSE (`ms` + 500000000000) / 1000000000000 * 1000000000000 END AS `bucket`
FROM (
	SELECT `uri`, `provider`, `model`, `sort_at`, CAST(round((julianday(`c`) - julianday(`s`)) * 86400000.0) AS INTEGER) AS `ms`
	FROM (
		SELECT `uri`, `provider`, `model`, `sort_at`,
			CASE WHEN substr(`s0`, 20, 1) = '.' THEN substr(`s0`, 1, 20 + min(3, length(`s0`) - 20 - length(ltrim(substr(`s0`, 21), '0123456789')))) || ltrim(substr(`s0`, 21), '0123456789') ELSE `s0` END AS `s`,
			CASE WHEN substr(`c0`, 20, 1) = '.' THEN substr(`c0`, 1, 20 + min(3, length(`c0`) - 20 - length(ltrim(substr(`c0`, 21), '0123456789')))) || ltrim(substr(`c0`, 21), '0123456789') ELSE `c0` END AS `c`
		FROM (
			SELECT `uri`, `did` AS `provider`, `model`, `sort_at`,
				CASE WHEN json_type(`body`, '$.startedAt') = 'text' AND json_extract(`body`, '$.startedAt') GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T*' THEN json_extract(`body`, '$.startedAt') END AS `s0`,
				CASE WHEN json_type(`body`, '$.completedAt') = 'text' AND json_extract(`body`, '$.completedAt') GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T*' THEN json_extract(`body`, '$.completedAt') END AS `c0`
			FROM `records` WHERE `collection` = 'dev.cocore.compute.receipt'
		)
	)
);--> statement-breakpoint
-- The handle the directory shows and searches: the DID document's, else the one the profile record claims.
CREATE VIEW `account_handles` AS
SELECT `s`.`did` AS `did`, COALESCE(NULLIF(`a`.`handle`, ''), (
	SELECT CASE WHEN json_type(`p`.`body`, '$.handle') = 'text' THEN NULLIF(json_extract(`p`.`body`, '$.handle'), '') END
	FROM `records` `p` WHERE `p`.`uri` = 'at://' || `s`.`did` || '/dev.cocore.account.profile/self')) AS `handle`
FROM `account_stats` `s` LEFT JOIN `accounts` `a` ON `a`.`did` = `s`.`did`;--> statement-breakpoint
-- Row changes of `records` (sign 1: a row as it now is, -1: a row as it was; an update is both), and the
-- same with the values several aggregates need, computed once. Each aggregate is kept by its own trigger.
CREATE VIEW `record_changes` AS SELECT 0 AS `sign`, `uri`, `did`, `collection`, `rkey`, `sort_at`, `model`, `subject_did` AS `subject`, `body` FROM `records` WHERE 0;--> statement-breakpoint
CREATE VIEW `record_facts` AS SELECT 0 AS `sign`, `uri`, `did`, `collection`, `rkey`, `sort_at`, `model`, `subject_did` AS `subject`, `body`, 0 AS `tokens`, '' AS `week` FROM `records` WHERE 0;--> statement-breakpoint
CREATE TRIGGER `record_changes_facts` INSTEAD OF INSERT ON `record_changes` BEGIN
	INSERT INTO `record_facts` SELECT NEW.`sign`, NEW.`uri`, NEW.`did`, NEW.`collection`, NEW.`rkey`, NEW.`sort_at`, NEW.`model`, NEW.`subject`, NEW.`body`,
		CASE WHEN NEW.`collection` = 'dev.cocore.compute.receipt'
			THEN CAST(COALESCE(json_extract(NEW.`body`, '$.tokens.in'), 0) AS INTEGER) + CAST(COALESCE(json_extract(NEW.`body`, '$.tokens.out'), 0) AS INTEGER) ELSE 0 END,
		COALESCE(date(substr(NEW.`sort_at`, 1, 10), '-6 days', 'weekday 1'), '');
END;--> statement-breakpoint
CREATE TRIGGER `records_added` AFTER INSERT ON `records` BEGIN
	INSERT INTO `record_changes` VALUES (1, NEW.`uri`, NEW.`did`, NEW.`collection`, NEW.`rkey`, NEW.`sort_at`, NEW.`model`, NEW.`subject_did`, NEW.`body`);
END;--> statement-breakpoint
CREATE TRIGGER `records_removed` AFTER DELETE ON `records` BEGIN
	INSERT INTO `record_changes` VALUES (-1, OLD.`uri`, OLD.`did`, OLD.`collection`, OLD.`rkey`, OLD.`sort_at`, OLD.`model`, OLD.`subject_did`, OLD.`body`);
END;--> statement-breakpoint
CREATE TRIGGER `records_changed` AFTER UPDATE ON `records` BEGIN
	INSERT INTO `record_changes` VALUES (-1, OLD.`uri`, OLD.`did`, OLD.`collection`, OLD.`rkey`, OLD.`sort_at`, OLD.`model`, OLD.`subject_did`, OLD.`body`);
	INSERT INTO `record_changes` VALUES (1, NEW.`uri`, NEW.`did`, NEW.`collection`, NEW.`rkey`, NEW.`sort_at`, NEW.`model`, NEW.`subject_did`, NEW.`body`);
END;--> statement-breakpoint
CREATE TRIGGER `facts_accounts_added` INSTEAD OF INSERT ON `record_facts` WHEN NEW.`sign` = 1 BEGIN
	INSERT INTO `account_collections` (`did`, `collection`, `n`, `first_at`, `last_at`) VALUES (NEW.`did`, NEW.`collection`, 1, NEW.`sort_at`, NEW.`sort_at`)
		ON CONFLICT (`did`, `collection`) DO UPDATE SET `n` = `n` + 1,
			`first_at` = CASE WHEN excluded.`first_at` <> '' AND (`first_at` = '' OR excluded.`first_at` < `first_at`) THEN excluded.`first_at` ELSE `first_at` END,
			`last_at` = max(`last_at`, excluded.`last_at`);
	INSERT INTO `account_stats` (`did`, `records`, `jobs`, `receipts`, `machines`, `tokens`, `joined_at`, `last_at`, `hidden`, `handle`)
		VALUES (NEW.`did`, 1, NEW.`collection` = 'dev.cocore.compute.job', NEW.`collection` = 'dev.cocore.compute.receipt', NEW.`collection` = 'dev.cocore.compute.provider',
			NEW.`tokens`, NEW.`sort_at`, NEW.`sort_at`, 0, NULL)
		ON CONFLICT (`did`) DO UPDATE SET `records` = `records` + 1, `jobs` = `jobs` + excluded.`jobs`, `receipts` = `receipts` + excluded.`receipts`,
			`machines` = `machines` + excluded.`machines`, `tokens` = `tokens` + excluded.`tokens`,
			`joined_at` = CASE WHEN excluded.`joined_at` <> '' AND (`joined_at` = '' OR excluded.`joined_at` < `joined_at`) THEN excluded.`joined_at` ELSE `joined_at` END,
			`last_at` = max(`last_at`, excluded.`last_at`);
	-- The account's first record: its status and handle.
	UPDATE `account_stats` SET `hidden` = EXISTS (SELECT 1 FROM `accounts` WHERE `did` = NEW.`did` AND `active` = 0), `handle` = (SELECT `handle` FROM `account_handles` WHERE `did` = NEW.`did`)
		WHERE `did` = NEW.`did` AND `records` = 1;
END;--> statement-breakpoint
-- @NOTE Order matters here: account_stats' first and last times are recomputed from account_collections once it is up to date.
CREATE TRIGGER `facts_accounts_removed` INSTEAD OF INSERT ON `record_facts` WHEN NEW.`sign` = -1 BEGIN
	UPDATE `account_collections` SET `n` = `n` - 1 WHERE `did` = NEW.`did` AND `collection` = NEW.`collection`;
	DELETE FROM `account_collections` WHERE `did` = NEW.`did` AND `collection` = NEW.`collection` AND `n` = 0;
	UPDATE `account_collections` SET
			`first_at` = COALESCE((SELECT MIN(`sort_at`) FROM `records` WHERE `did` = NEW.`did` AND `collection` = NEW.`collection` AND `sort_at` > ''), ''),
			`last_at` = COALESCE((SELECT MAX(`sort_at`) FROM `records` WHERE `did` = NEW.`did` AND `collection` = NEW.`collection`), '')
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
CREATE TRIGGER `facts_profile` INSTEAD OF INSERT ON `record_facts` WHEN NEW.`collection` = 'dev.cocore.account.profile' AND NEW.`rkey` = 'self' BEGIN
	UPDATE `account_stats` SET `handle` = (SELECT `handle` FROM `account_handles` WHERE `did` = NEW.`did`) WHERE `did` = NEW.`did`;
END;--> statement-breakpoint
CREATE TRIGGER `facts_weeks` INSTEAD OF INSERT ON `record_facts`
	WHEN NEW.`collection` IN ('dev.cocore.compute.job', 'dev.cocore.compute.receipt', 'dev.cocore.compute.provider') BEGIN
	INSERT INTO `account_weeks` (`did`, `week`, `jobs`, `receipts`, `tokens`, `machines`)
		VALUES (NEW.`did`, NEW.`week`, NEW.`sign` * (NEW.`collection` = 'dev.cocore.compute.job'), NEW.`sign` * (NEW.`collection` = 'dev.cocore.compute.receipt'),
			NEW.`sign` * NEW.`tokens`, NEW.`sign` * (NEW.`collection` = 'dev.cocore.compute.provider'))
		ON CONFLICT (`did`, `week`) DO UPDATE SET `jobs` = `jobs` + excluded.`jobs`, `receipts` = `receipts` + excluded.`receipts`,
			`tokens` = `tokens` + excluded.`tokens`, `machines` = `machines` + excluded.`machines`;
	DELETE FROM `account_weeks` WHERE NEW.`sign` = -1 AND `did` = NEW.`did` AND `week` = NEW.`week`
		AND `jobs` = 0 AND `receipts` = 0 AND `tokens` = 0 AND `machines` = 0 AND `trusted` = 0;
END;--> statement-breakpoint
CREATE TRIGGER `facts_model_activity` INSTEAD OF INSERT ON `record_facts`
	WHEN NEW.`collection` = 'dev.cocore.compute.receipt' AND NEW.`model` IS NOT NULL BEGIN
	INSERT INTO `model_activity` (`model`, `provider`, `requests`, `tokens`, `hour_requests`, `hour_tokens`, `day_requests`, `day_tokens`, `week_requests`, `week_tokens`, `month_requests`, `month_tokens`)
		SELECT NEW.`model`, NEW.`did`, NEW.`sign`, NEW.`sign` * NEW.`tokens`,
			NEW.`sign` * `w`.`hour`, NEW.`sign` * `w`.`hour` * NEW.`tokens`, NEW.`sign` * `w`.`day`, NEW.`sign` * `w`.`day` * NEW.`tokens`,
			NEW.`sign` * `w`.`week`, NEW.`sign` * `w`.`week` * NEW.`tokens`, NEW.`sign` * `w`.`month`, NEW.`sign` * `w`.`month` * NEW.`tokens`
		FROM (SELECT
			NEW.`sort_at` >= (SELECT `at` FROM `activity_windows` WHERE `name` = 'hour') AS `hour`,
			NEW.`sort_at` >= (SELECT `at` FROM `activity_windows` WHERE `name` = 'day') AS `day`,
			NEW.`sort_at` >= (SELECT `at` FROM `activity_windows` WHERE `name` = 'week') AS `week`,
			NEW.`sort_at` >= (SELECT `at` FROM `activity_windows` WHERE `name` = 'month') AS `month`) `w` WHERE true
		ON CONFLICT (`model`, `provider`) DO UPDATE SET `requests` = `requests` + excluded.`requests`, `tokens` = `tokens` + excluded.`tokens`,
			`hour_requests` = `hour_requests` + excluded.`hour_requests`, `hour_tokens` = `hour_tokens` + excluded.`hour_tokens`,
			`day_requests` = `day_requests` + excluded.`day_requests`, `day_tokens` = `day_tokens` + excluded.`day_tokens`,
			`week_requests` = `week_requests` + excluded.`week_requests`, `week_tokens` = `week_tokens` + excluded.`week_tokens`,
			`month_requests` = `month_requests` + excluded.`month_requests`, `month_tokens` = `month_tokens` + excluded.`month_tokens`;
	DELETE FROM `model_activity` WHERE NEW.`sign` = -1 AND `model` = NEW.`model` AND `provider` = NEW.`did` AND `requests` = 0;
END;--> statement-breakpoint
CREATE TRIGGER `facts_model_machines` INSTEAD OF INSERT ON `record_facts`
	WHEN NEW.`collection` = 'dev.cocore.compute.provider' BEGIN
	INSERT INTO `model_machines` (`model`, `did`, `machines`)
		SELECT DISTINCT `value`, NEW.`did`, NEW.`sign` FROM json_each(NEW.`body`, '$.supportedModels')
		WHERE json_type(NEW.`body`, '$.supportedModels') = 'array' AND `type` = 'text' AND `value` <> ''
		ON CONFLICT (`model`, `did`) DO UPDATE SET `machines` = `machines` + excluded.`machines`;
	DELETE FROM `model_machines` WHERE NEW.`sign` = -1 AND `did` = NEW.`did` AND `machines` = 0;
END;--> statement-breakpoint
-- Only receipts inside the week window are samples: the others cost one comparison.
CREATE TRIGGER `facts_latency_added` INSTEAD OF INSERT ON `record_facts`
	WHEN NEW.`sign` = 1 AND NEW.`collection` = 'dev.cocore.compute.receipt' AND NEW.`sort_at` >= (SELECT `at` FROM `activity_windows` WHERE `name` = 'week') BEGIN
	INSERT INTO `latency_samples` (`uri`, `provider`, `model`, `sort_at`, `ms`, `bucket`)
		SELECT `uri`, `provider`, `model`, `sort_at`, `ms`, `bucket` FROM `receipt_samples`
		WHERE `uri` = NEW.`uri` AND `ms` >= 0 AND NOT EXISTS (SELECT 1 FROM `accounts` WHERE `did` = NEW.`did` AND `active` = 0);
END;--> statement-breakpoint
CREATE TRIGGER `facts_latency_removed` INSTEAD OF INSERT ON `record_facts` WHEN NEW.`sign` = -1 AND NEW.`collection` = 'dev.cocore.compute.receipt' BEGIN
	DELETE FROM `latency_samples` WHERE `uri` = NEW.`uri`;
END;--> statement-breakpoint
-- A pair's first record is its oldest by (sort_at, uri); removing it finds the next from records_edges.
CREATE TRIGGER `facts_friend_edges_added` INSTEAD OF INSERT ON `record_facts`
	WHEN NEW.`sign` = 1 AND NEW.`collection` = 'dev.cocore.account.friend' AND NEW.`subject` IS NOT NULL BEGIN
	INSERT INTO `friend_edges` (`friender`, `subject`, `n`, `first_at`, `first_uri`, `created_at`, `friender_hidden`, `subject_hidden`)
		VALUES (NEW.`did`, NEW.`subject`, 1, NEW.`sort_at`, NEW.`uri`,
			CASE WHEN json_type(NEW.`body`, '$.createdAt') = 'text' THEN json_extract(NEW.`body`, '$.createdAt') END,
			EXISTS (SELECT 1 FROM `accounts` WHERE `did` = NEW.`did` AND `active` = 0),
			EXISTS (SELECT 1 FROM `accounts` WHERE `did` = NEW.`subject` AND `active` = 0))
		ON CONFLICT (`friender`, `subject`) DO UPDATE SET `n` = `n` + 1,
			`first_at` = CASE WHEN (excluded.`first_at`, excluded.`first_uri`) < (`first_at`, `first_uri`) THEN excluded.`first_at` ELSE `first_at` END,
			`first_uri` = CASE WHEN (excluded.`first_at`, excluded.`first_uri`) < (`first_at`, `first_uri`) THEN excluded.`first_uri` ELSE `first_uri` END,
			`created_at` = CASE WHEN (excluded.`first_at`, excluded.`first_uri`) < (`first_at`, `first_uri`) THEN excluded.`created_at` ELSE `created_at` END;
END;--> statement-breakpoint
CREATE TRIGGER `facts_friend_edges_removed` INSTEAD OF INSERT ON `record_facts`
	WHEN NEW.`sign` = -1 AND NEW.`collection` = 'dev.cocore.account.friend' AND NEW.`subject` IS NOT NULL BEGIN
	UPDATE `friend_edges` SET `n` = `n` - 1 WHERE `friender` = NEW.`did` AND `subject` = NEW.`subject`;
	DELETE FROM `friend_edges` WHERE `friender` = NEW.`did` AND `subject` = NEW.`subject` AND `n` = 0;
	UPDATE `friend_edges` SET (`first_at`, `first_uri`, `created_at`) = (
			SELECT `sort_at`, `uri`, CASE WHEN json_type(`body`, '$.createdAt') = 'text' THEN json_extract(`body`, '$.createdAt') END
			FROM `records` WHERE `collection` = 'dev.cocore.account.friend' AND `did` = NEW.`did` AND `subject_did` = NEW.`subject`
			ORDER BY `sort_at`, `uri` LIMIT 1)
		WHERE `friender` = NEW.`did` AND `subject` = NEW.`subject` AND `first_uri` = NEW.`uri`;
END;--> statement-breakpoint
-- What a pair of friends adds to its subject's counts (when the friender is visible) and to the listed edges (both visible, not a self-edge).
CREATE VIEW `friend_edge_changes` AS SELECT 0 AS `sign`, `friender`, `subject`, `first_at`, `friender_hidden`, `subject_hidden` FROM `friend_edges` WHERE 0;--> statement-breakpoint
CREATE TRIGGER `friend_edge_changes_apply` INSTEAD OF INSERT ON `friend_edge_changes` BEGIN
	INSERT INTO `friend_counts` (`subject`, `n`) SELECT NEW.`subject`, NEW.`sign` WHERE NEW.`friender_hidden` = 0
		ON CONFLICT (`subject`) DO UPDATE SET `n` = `n` + excluded.`n`;
	DELETE FROM `friend_counts` WHERE `subject` = NEW.`subject` AND `n` = 0;
	INSERT INTO `account_weeks` (`did`, `week`, `trusted`)
		SELECT NEW.`subject`, COALESCE(date(substr(NEW.`first_at`, 1, 10), '-6 days', 'weekday 1'), ''), NEW.`sign` WHERE NEW.`friender_hidden` = 0
		ON CONFLICT (`did`, `week`) DO UPDATE SET `trusted` = `trusted` + excluded.`trusted`;
	DELETE FROM `account_weeks` WHERE `did` = NEW.`subject` AND `week` = COALESCE(date(substr(NEW.`first_at`, 1, 10), '-6 days', 'weekday 1'), '')
		AND `jobs` = 0 AND `receipts` = 0 AND `tokens` = 0 AND `machines` = 0 AND `trusted` = 0;
	INSERT INTO `index_counts` (`name`, `n`) SELECT 'friend_edges', NEW.`sign`
		WHERE NEW.`friender_hidden` = 0 AND NEW.`subject_hidden` = 0 AND NEW.`friender` <> NEW.`subject`
		ON CONFLICT (`name`) DO UPDATE SET `n` = `n` + excluded.`n`;
	DELETE FROM `index_counts` WHERE `name` = 'friend_edges' AND `n` = 0;
END;--> statement-breakpoint
CREATE TRIGGER `friend_edges_added` AFTER INSERT ON `friend_edges` BEGIN
	INSERT INTO `friend_edge_changes` VALUES (1, NEW.`friender`, NEW.`subject`, NEW.`first_at`, NEW.`friender_hidden`, NEW.`subject_hidden`);
END;--> statement-breakpoint
CREATE TRIGGER `friend_edges_removed` AFTER DELETE ON `friend_edges` BEGIN
	INSERT INTO `friend_edge_changes` VALUES (-1, OLD.`friender`, OLD.`subject`, OLD.`first_at`, OLD.`friender_hidden`, OLD.`subject_hidden`);
END;--> statement-breakpoint
CREATE TRIGGER `friend_edges_changed` AFTER UPDATE OF `first_at`, `friender_hidden`, `subject_hidden` ON `friend_edges`
	WHEN OLD.`first_at` IS NOT NEW.`first_at` OR OLD.`friender_hidden` IS NOT NEW.`friender_hidden` OR OLD.`subject_hidden` IS NOT NEW.`subject_hidden` BEGIN
	INSERT INTO `friend_edge_changes` VALUES (-1, OLD.`friender`, OLD.`subject`, OLD.`first_at`, OLD.`friender_hidden`, OLD.`subject_hidden`);
	INSERT INTO `friend_edge_changes` VALUES (1, NEW.`friender`, NEW.`subject`, NEW.`first_at`, NEW.`friender_hidden`, NEW.`subject_hidden`);
END;--> statement-breakpoint
-- Per latency scope: the histogram, the count and sum, the newest sample, and each percentile's bucket with
-- the count below it. Adding or removing one sample moves the nearest rank by at most one, so a percentile
-- moves by at most one non-empty bucket: one index step, never a walk of the histogram.
CREATE VIEW `latency_changes` AS SELECT 0 AS `sign`, `kind`, `key`, 0 AS `bucket`, 0 AS `ms`, '' AS `sort_at`, '' AS `uri` FROM `latency_stats` WHERE 0;--> statement-breakpoint
-- A scope's percentiles after a sample came or went: each moves to the next non-empty bucket below or above
-- when its rank left its bucket (at most one step, see above).
CREATE VIEW `latency_pointer_moves` AS SELECT `kind`, `key` FROM `latency_stats` WHERE 0;--> statement-breakpoint
CREATE TRIGGER `latency_pointer_moves_apply` INSTEAD OF INSERT ON `latency_pointer_moves` BEGIN
	UPDATE `latency_stats` SET
			`p50` = CASE WHEN `below50` >= (50 * `n` + 99) / 100 THEN (SELECT `h`.`bucket` FROM `latency_hist` `h` WHERE `h`.`kind` = NEW.`kind` AND `h`.`key` = NEW.`key` AND `h`.`bucket` < `latency_stats`.`p50` ORDER BY `h`.`bucket` DESC LIMIT 1) ELSE (SELECT `h`.`bucket` FROM `latency_hist` `h` WHERE `h`.`kind` = NEW.`kind` AND `h`.`key` = NEW.`key` AND `h`.`bucket` > `latency_stats`.`p50` ORDER BY `h`.`bucket` ASC LIMIT 1) END,
			`below50` = CASE WHEN `below50` >= (50 * `n` + 99) / 100 THEN `below50` - (SELECT `h`.`n` FROM `latency_hist` `h` WHERE `h`.`kind` = NEW.`kind` AND `h`.`key` = NEW.`key` AND `h`.`bucket` < `latency_stats`.`p50` ORDER BY `h`.`bucket` DESC LIMIT 1) ELSE `below50` + COALESCE((SELECT `h`.`n` FROM `latency_hist` `h` WHERE `h`.`kind` = NEW.`kind` AND `h`.`key` = NEW.`key` AND `h`.`bucket` = `latency_stats`.`p50` ORDER BY `h`.`bucket` ASC LIMIT 1), 0) END
		WHERE `kind` = NEW.`kind` AND `key` = NEW.`key` AND (`below50` >= (50 * `n` + 99) / 100 OR `below50` + COALESCE((SELECT `h`.`n` FROM `latency_hist` `h` WHERE `h`.`kind` = NEW.`kind` AND `h`.`key` = NEW.`key` AND `h`.`bucket` = `latency_stats`.`p50` ORDER BY `h`.`bucket` ASC LIMIT 1), 0) < (50 * `n` + 99) / 100);
	UPDATE `latency_stats` SET
			`p95` = CASE WHEN `below95` >= (95 * `n` + 99) / 100 THEN (SELECT `h`.`bucket` FROM `latency_hist` `h` WHERE `h`.`kind` = NEW.`kind` AND `h`.`key` = NEW.`key` AND `h`.`bucket` < `latency_stats`.`p95` ORDER BY `h`.`bucket` DESC LIMIT 1) ELSE (SELECT `h`.`bucket` FROM `latency_hist` `h` WHERE `h`.`kind` = NEW.`kind` AND `h`.`key` = NEW.`key` AND `h`.`bucket` > `latency_stats`.`p95` ORDER BY `h`.`bucket` ASC LIMIT 1) END,
			`below95` = CASE WHEN `below95` >= (95 * `n` + 99) / 100 THEN `below95` - (SELECT `h`.`n` FROM `latency_hist` `h` WHERE `h`.`kind` = NEW.`kind` AND `h`.`key` = NEW.`key` AND `h`.`bucket` < `latency_stats`.`p95` ORDER BY `h`.`bucket` DESC LIMIT 1) ELSE `below95` + COALESCE((SELECT `h`.`n` FROM `latency_hist` `h` WHERE `h`.`kind` = NEW.`kind` AND `h`.`key` = NEW.`key` AND `h`.`bucket` = `latency_stats`.`p95` ORDER BY `h`.`bucket` ASC LIMIT 1), 0) END
		WHERE `kind` = NEW.`kind` AND `key` = NEW.`key` AND (`below95` >= (95 * `n` + 99) / 100 OR `below95` + COALESCE((SELECT `h`.`n` FROM `latency_hist` `h` WHERE `h`.`kind` = NEW.`kind` AND `h`.`key` = NEW.`key` AND `h`.`bucket` = `latency_stats`.`p95` ORDER BY `h`.`bucket` ASC LIMIT 1), 0) < (95 * `n` + 99) / 100);
END;--> statement-breakpoint
CREATE TRIGGER `latency_changes_added` INSTEAD OF INSERT ON `latency_changes` WHEN NEW.`sign` = 1 BEGIN
	INSERT INTO `latency_hist` (`kind`, `key`, `bucket`, `n`) VALUES (NEW.`kind`, NEW.`key`, NEW.`bucket`, 1)
		ON CONFLICT (`kind`, `key`, `bucket`) DO UPDATE SET `n` = `n` + 1;
	INSERT INTO `latency_stats` (`kind`, `key`, `n`, `sum`, `p50`, `below50`, `p95`, `below95`, `last_at`, `last_uri`, `last_ms`)
		VALUES (NEW.`kind`, NEW.`key`, 1, NEW.`ms`, NEW.`bucket`, 0, NEW.`bucket`, 0, NEW.`sort_at`, NEW.`uri`, NEW.`ms`)
		ON CONFLICT (`kind`, `key`) DO UPDATE SET `n` = `n` + 1, `sum` = `sum` + excluded.`sum`,
			`below50` = `below50` + (excluded.`p50` < `p50`), `below95` = `below95` + (excluded.`p95` < `p95`),
			`last_at` = CASE WHEN (excluded.`last_at`, excluded.`last_uri`) > (`last_at`, `last_uri`) THEN excluded.`last_at` ELSE `last_at` END,
			`last_uri` = CASE WHEN (excluded.`last_at`, excluded.`last_uri`) > (`last_at`, `last_uri`) THEN excluded.`last_uri` ELSE `last_uri` END,
			`last_ms` = CASE WHEN (excluded.`last_at`, excluded.`last_uri`) > (`last_at`, `last_uri`) THEN excluded.`last_ms` ELSE `last_ms` END;
	INSERT INTO `latency_pointer_moves` VALUES (NEW.`kind`, NEW.`key`);
END;--> statement-breakpoint
CREATE TRIGGER `latency_changes_removed` INSTEAD OF INSERT ON `latency_changes` WHEN NEW.`sign` = -1 BEGIN
	UPDATE `latency_hist` SET `n` = `n` - 1 WHERE `kind` = NEW.`kind` AND `key` = NEW.`key` AND `bucket` = NEW.`bucket`;
	DELETE FROM `latency_hist` WHERE `kind` = NEW.`kind` AND `key` = NEW.`key` AND `bucket` = NEW.`bucket` AND `n` = 0;
	UPDATE `latency_stats` SET `n` = `n` - 1, `sum` = `sum` - NEW.`ms`, `below50` = `below50` - (NEW.`bucket` < `p50`), `below95` = `below95` - (NEW.`bucket` < `p95`)
		WHERE `kind` = NEW.`kind` AND `key` = NEW.`key`;
	DELETE FROM `latency_stats` WHERE `kind` = NEW.`kind` AND `key` = NEW.`key` AND `n` = 0;
	-- The newest sample, when it was the one removed.
	UPDATE `latency_stats` SET (`last_at`, `last_uri`, `last_ms`) = (SELECT `sort_at`, `uri`, `ms` FROM `latency_samples` ORDER BY `sort_at` DESC, `uri` DESC LIMIT 1)
		WHERE NEW.`kind` = 'all' AND `kind` = 'all' AND `key` = '' AND `last_uri` = NEW.`uri`;
	UPDATE `latency_stats` SET (`last_at`, `last_uri`, `last_ms`) = (SELECT `sort_at`, `uri`, `ms` FROM `latency_samples` WHERE `provider` = NEW.`key` ORDER BY `sort_at` DESC, `uri` DESC LIMIT 1)
		WHERE NEW.`kind` = 'provider' AND `kind` = 'provider' AND `key` = NEW.`key` AND `last_uri` = NEW.`uri`;
	UPDATE `latency_stats` SET (`last_at`, `last_uri`, `last_ms`) = (SELECT `sort_at`, `uri`, `ms` FROM `latency_samples` WHERE `model` = NEW.`key` ORDER BY `sort_at` DESC, `uri` DESC LIMIT 1)
		WHERE NEW.`kind` = 'model' AND `kind` = 'model' AND `key` = NEW.`key` AND `last_uri` = NEW.`uri`;
	INSERT INTO `latency_pointer_moves` VALUES (NEW.`kind`, NEW.`key`);
END;--> statement-breakpoint
CREATE TRIGGER `latency_samples_added` AFTER INSERT ON `latency_samples` BEGIN
	INSERT INTO `latency_changes` SELECT 1, `k`.`kind`, `k`.`key`, NEW.`bucket`, NEW.`ms`, NEW.`sort_at`, NEW.`uri`
		FROM (SELECT 'all' AS `kind`, '' AS `key` UNION ALL SELECT 'provider', NEW.`provider` UNION ALL SELECT 'model', NEW.`model` WHERE NEW.`model` IS NOT NULL) `k`;
END;--> statement-breakpoint
CREATE TRIGGER `latency_samples_removed` AFTER DELETE ON `latency_samples` BEGIN
	INSERT INTO `latency_changes` SELECT -1, `k`.`kind`, `k`.`key`, OLD.`bucket`, OLD.`ms`, OLD.`sort_at`, OLD.`uri`
		FROM (SELECT 'all' AS `kind`, '' AS `key` UNION ALL SELECT 'provider', OLD.`provider` UNION ALL SELECT 'model', OLD.`model` WHERE OLD.`model` IS NOT NULL) `k`;
END;--> statement-breakpoint
-- An account hidden (deactivated, suspended) or shown again: its flag in the directory and on friend pairs,
-- and its receipts out of or back into the latency samples.
CREATE VIEW `account_visibility` AS SELECT `did`, 0 AS `hidden` FROM `accounts` WHERE 0;--> statement-breakpoint
CREATE TRIGGER `account_visibility_apply` INSTEAD OF INSERT ON `account_visibility` BEGIN
	UPDATE `account_stats` SET `hidden` = NEW.`hidden` WHERE `did` = NEW.`did`;
	UPDATE `friend_edges` SET `friender_hidden` = NEW.`hidden` WHERE `friender` = NEW.`did`;
	UPDATE `friend_edges` SET `subject_hidden` = NEW.`hidden` WHERE `subject` = NEW.`did`;
	DELETE FROM `latency_samples` WHERE NEW.`hidden` = 1 AND `provider` = NEW.`did`;
	INSERT INTO `latency_samples` (`uri`, `provider`, `model`, `sort_at`, `ms`, `bucket`)
		SELECT `uri`, `provider`, `model`, `sort_at`, `ms`, `bucket` FROM `receipt_samples`
		WHERE NEW.`hidden` = 0 AND `provider` = NEW.`did` AND `ms` >= 0 AND `sort_at` >= (SELECT `at` FROM `activity_windows` WHERE `name` = 'week');
END;--> statement-breakpoint
CREATE TRIGGER `accounts_added` AFTER INSERT ON `accounts` BEGIN
	INSERT INTO `account_visibility` SELECT NEW.`did`, 1 WHERE NEW.`active` = 0;
	UPDATE `account_stats` SET `handle` = (SELECT `handle` FROM `account_handles` WHERE `did` = NEW.`did`) WHERE NEW.`handle` IS NOT NULL AND `did` = NEW.`did`;
END;--> statement-breakpoint
CREATE TRIGGER `accounts_changed` AFTER UPDATE OF `active`, `handle` ON `accounts` BEGIN
	INSERT INTO `account_visibility` SELECT NEW.`did`, NEW.`active` = 0 WHERE (OLD.`active` = 0) IS NOT (NEW.`active` = 0);
	UPDATE `account_stats` SET `handle` = (SELECT `handle` FROM `account_handles` WHERE `did` = NEW.`did`) WHERE OLD.`handle` IS NOT NEW.`handle` AND `did` = NEW.`did`;
END;--> statement-breakpoint
CREATE TRIGGER `accounts_removed` AFTER DELETE ON `accounts` BEGIN
	INSERT INTO `account_visibility` SELECT OLD.`did`, 0 WHERE OLD.`active` = 0;
	UPDATE `account_stats` SET `handle` = (SELECT `handle` FROM `account_handles` WHERE `did` = OLD.`did`) WHERE OLD.`handle` IS NOT NULL AND `did` = OLD.`did`;
END;--> statement-breakpoint
-- The aggregates of the rows already indexed.
INSERT INTO `record_changes` SELECT 1, `uri`, `did`, `collection`, `rkey`, `sort_at`, `model`, `subject_did`, `body` FROM `records`;
