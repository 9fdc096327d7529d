-- Remove trioban's objects from a prefix (the schema itself is left unless asked).
DROP TABLE IF EXISTS {prefix}.oban_jobs;
DROP TABLE IF EXISTS {prefix}.oban_peers;
DROP TABLE IF EXISTS {prefix}.trioban_producers;
DROP TABLE IF EXISTS {prefix}.trioban_schema;
DROP TYPE IF EXISTS {prefix}.oban_job_state;
