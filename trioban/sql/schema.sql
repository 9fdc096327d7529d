-- trioban schema, Oban-compatible. The prefix marker becomes the validated, quoted schema name.
-- Every statement is idempotent: install() runs the whole file under an advisory lock, and
-- only when the recorded version is older than {version} (DDL locks tables busy nodes use).
-- install() first locks the existing tables this file alters (_schema._ALTERED_TABLES, keep
-- it in step) in ACCESS EXCLUSIVE mode, so the statements below can't deadlock with nodes.

CREATE SCHEMA IF NOT EXISTS {prefix};

DO $$
BEGIN
  CREATE TYPE {prefix}.oban_job_state AS ENUM (
    'available', 'scheduled', 'executing', 'retryable', 'completed', 'discarded', 'cancelled'
  );
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;

-- Added by later Oban versions; held workflow jobs wait in this state.
ALTER TYPE {prefix}.oban_job_state ADD VALUE IF NOT EXISTS 'suspended' BEFORE 'executing';

CREATE TABLE IF NOT EXISTS {prefix}.oban_jobs (
  id bigserial PRIMARY KEY,
  state {prefix}.oban_job_state NOT NULL DEFAULT 'available',
  queue text NOT NULL DEFAULT 'default',
  worker text NOT NULL,
  args jsonb NOT NULL DEFAULT '{}',
  errors jsonb[] NOT NULL DEFAULT ARRAY[]::jsonb[],
  attempt integer NOT NULL DEFAULT 0,
  max_attempts integer NOT NULL DEFAULT 20,
  inserted_at timestamp without time zone NOT NULL DEFAULT timezone('UTC', now()),
  scheduled_at timestamp without time zone NOT NULL DEFAULT timezone('UTC', now()),
  attempted_at timestamp without time zone,
  completed_at timestamp without time zone,
  attempted_by text[],
  discarded_at timestamp without time zone,
  priority integer NOT NULL DEFAULT 0,
  tags text[] DEFAULT ARRAY[]::text[],
  meta jsonb DEFAULT '{}',
  cancelled_at timestamp without time zone,
  CONSTRAINT attempt_range CHECK (attempt >= 0 AND attempt <= max_attempts),
  CONSTRAINT positive_max_attempts CHECK (max_attempts > 0),
  CONSTRAINT queue_length CHECK (char_length(queue) > 0 AND char_length(queue) < 128),
  CONSTRAINT worker_length CHECK (char_length(worker) > 0 AND char_length(worker) < 128),
  CONSTRAINT non_negative_priority CHECK (priority >= 0)
);

-- Fetch: available jobs of one queue in priority, scheduled_at, id order.
CREATE INDEX IF NOT EXISTS oban_jobs_state_queue_priority_scheduled_at_id_index
  ON {prefix}.oban_jobs (state, queue, priority, scheduled_at, id);
-- Staging: scheduled and retryable jobs by due time only.
CREATE INDEX IF NOT EXISTS oban_jobs_staging_index
  ON {prefix}.oban_jobs (scheduled_at, id) WHERE state IN ('scheduled', 'retryable');
CREATE INDEX IF NOT EXISTS oban_jobs_args_index ON {prefix}.oban_jobs USING gin (args);
CREATE INDEX IF NOT EXISTS oban_jobs_meta_index ON {prefix}.oban_jobs USING gin (meta);

-- Unique jobs: a job's key under its constraint. The unique index is what makes concurrent
-- inserts of one unique job race-free; rows without a key cost it nothing.
ALTER TABLE {prefix}.oban_jobs ADD COLUMN IF NOT EXISTS uniq_key text;
CREATE UNIQUE INDEX IF NOT EXISTS oban_jobs_unique_index
  ON {prefix}.oban_jobs (uniq_key) WHERE uniq_key IS NOT NULL;

-- Workflows and batches find their jobs by the ids in meta.
CREATE INDEX IF NOT EXISTS oban_jobs_workflow_index
  ON {prefix}.oban_jobs ((meta->>'workflow_id'), (meta->>'name')) WHERE meta ? 'workflow_id';
CREATE INDEX IF NOT EXISTS oban_jobs_batch_index
  ON {prefix}.oban_jobs ((meta->>'batch_id')) WHERE meta ? 'batch_id';

CREATE UNLOGGED TABLE IF NOT EXISTS {prefix}.oban_peers (
  name text PRIMARY KEY,
  node text NOT NULL,
  started_at timestamp without time zone NOT NULL,
  expires_at timestamp without time zone NOT NULL
);

-- trioban's own tables.
CREATE TABLE IF NOT EXISTS {prefix}.trioban_producers (
  uuid uuid PRIMARY KEY,
  node text NOT NULL,
  queue text NOT NULL,
  started_at timestamp without time zone NOT NULL DEFAULT timezone('UTC', now()),
  updated_at timestamp without time zone NOT NULL DEFAULT timezone('UTC', now())
);

ALTER TABLE {prefix}.trioban_producers ADD COLUMN IF NOT EXISTS meta jsonb NOT NULL DEFAULT '{}';

CREATE TABLE IF NOT EXISTS {prefix}.trioban_schema (
  component text PRIMARY KEY,
  version integer NOT NULL
);

INSERT INTO {prefix}.trioban_schema (component, version) VALUES ('trioban', {version})
  ON CONFLICT (component) DO UPDATE SET version = greatest(excluded.version,
    {prefix}.trioban_schema.version);
