ALTER TABLE `repos` ADD `head` text;--> statement-breakpoint
ALTER TABLE `repos` ADD `head_data` text;