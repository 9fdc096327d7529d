-- Named statements. Each block starts with "-- name: <name>" and a one-line description.
-- {prefix} is replaced by the validated, quoted schema name; values are always %(name)s.
-- Common columns of a job row, in trioban._sql.JOB_COLUMNS order, are selected by "{job}".

-- name: insert_job_row
-- A fragment, "{insert_job_row}": the INSERT ... SELECT of job rows from the JSON of jobs, r.
-- A NULL state means "available unless scheduled". A row with attempted_by is claimed as it is
-- inserted (executing, attempt 1) by a producer of this node with a free slot and an empty
-- queue: it runs without a fetch round trip.
  INSERT INTO {prefix}.oban_jobs
    (state, queue, worker, args, meta, tags, max_attempts, priority, scheduled_at, attempt,
     attempted_at, attempted_by)
  SELECT
    CASE WHEN r.attempted_by IS NOT NULL THEN 'executing'
         ELSE coalesce(r.state, CASE WHEN r.scheduled_at > timezone('UTC', now())
                                     THEN 'scheduled' ELSE 'available' END)
    END::{prefix}.oban_job_state,
    r.queue, r.worker, r.args, r.meta, r.tags, r.max_attempts, r.priority,
    coalesce(r.scheduled_at, timezone('UTC', now())),
    CASE WHEN r.attempted_by IS NULL THEN 0 ELSE 1 END,
    CASE WHEN r.attempted_by IS NOT NULL THEN timezone('UTC', now()) END,
    r.attempted_by

-- name: insert_jobs
-- Insert a batch in one statement; the same statement notifies each queue given available jobs,
-- so a rolled-back insert announces nothing. The batch travels as one JSON array (cheaper to
-- build and to parse than a column of arrays).
WITH input AS (
  SELECT * FROM ROWS FROM (
    jsonb_to_recordset(%(jobs)s::jsonb) AS (
      state text, queue text, worker text, args jsonb, meta jsonb, tags text[],
      max_attempts int, priority int, scheduled_at timestamp, attempted_by text[]
    )
  ) WITH ORDINALITY AS r(state, queue, worker, args, meta, tags, max_attempts, priority,
                         scheduled_at, attempted_by, ord)
), inserted AS (
  {insert_job_row}
  FROM input AS r
  ORDER BY r.ord
  RETURNING id, state, queue, inserted_at, scheduled_at, attempted_at
), notified AS (
  -- The batch's queues come as a parameter: a probe per queue beats sorting every row.
  SELECT pg_notify(%(channel)s, json_build_object('queue', q)::text)
  FROM unnest(%(queues)s::text[]) AS q
  WHERE EXISTS (SELECT 1 FROM inserted AS i WHERE i.queue = q AND i.state = 'available')
)
-- Referencing "notified" makes PostgreSQL evaluate it; ids follow input order (ORDER BY ord).
SELECT id, state::text, inserted_at, scheduled_at, attempted_at FROM inserted
WHERE (SELECT count(*) FROM notified) >= 0
ORDER BY id

-- name: insert_job
-- insert_jobs for one job, which the server runs about a sixth faster (no recordset, no sorts).
WITH inserted AS (
  {insert_job_row}
  FROM jsonb_to_record(%(job)s::jsonb) AS r(
    state text, queue text, worker text, args jsonb, meta jsonb, tags text[],
    max_attempts int, priority int, scheduled_at timestamp, attempted_by text[]
  )
  RETURNING id, state, queue, inserted_at, scheduled_at, attempted_at
), notified AS (
  SELECT pg_notify(%(channel)s, json_build_object('queue', i.queue)::text)
  FROM inserted AS i WHERE i.state = 'available'
)
SELECT id, state::text, inserted_at, scheduled_at, attempted_at FROM inserted
WHERE (SELECT count(*) FROM notified) >= 0

-- name: reserve_job_ids
-- Draw %(count)s ids from the jobs' sequence for a COPY, with the transaction's time as UTC.
SELECT array_agg(nextval('{prefix}.oban_jobs_id_seq')), timezone('UTC', now())
FROM generate_series(1, %(count)s)

-- name: copy_jobs
-- The rows of a bulk insert, in the column order trioban._bulk writes them.
COPY {prefix}.oban_jobs
  (id, state, queue, worker, args, meta, tags, max_attempts, priority, scheduled_at, attempt,
   attempted_at, attempted_by)
FROM STDIN

-- name: insert_unique_job
-- Insert one unique job unless a job holds its key; returns the row only if it was inserted.
INSERT INTO {prefix}.oban_jobs AS j
  (state, queue, worker, args, meta, tags, max_attempts, priority, scheduled_at, uniq_key)
SELECT
  coalesce(r.state, CASE WHEN r.scheduled_at > timezone('UTC', now())
                         THEN 'scheduled' ELSE 'available' END)::{prefix}.oban_job_state,
  r.queue, r.worker, r.args, r.meta, r.tags, r.max_attempts, r.priority,
  coalesce(r.scheduled_at, timezone('UTC', now())), %(uniq_key)s
FROM jsonb_to_record(%(job)s::jsonb) AS r(
  state text, queue text, worker text, args jsonb, meta jsonb, tags text[], max_attempts int,
  priority int, scheduled_at timestamp
)
ON CONFLICT (uniq_key) WHERE uniq_key IS NOT NULL DO NOTHING
RETURNING {job}

-- name: lock_unique_job
-- The job holding a unique key, locked until the inserting transaction ends.
SELECT {job}, j.inserted_at < timezone('UTC', now()) - make_interval(secs => %(period)s)
FROM {prefix}.oban_jobs AS j WHERE j.uniq_key = %(uniq_key)s
FOR UPDATE

-- name: release_unique_key
-- An existing job outside the period or the states gives up its key.
UPDATE {prefix}.oban_jobs SET uniq_key = NULL WHERE id = %(id)s

-- name: replace_unique_job
-- Overwrite the given fields of an existing unique job (a NULL field is left alone). A new
-- scheduled_at also moves a waiting job between scheduled and available. A new meta replaces
-- the user's keys only: the job keeps trioban's own ("kept": its batch, workflow, relay ref,
-- recorded result, cron keys) and none come from the new meta ("dropped"), or a duplicate
-- would move the job to another batch, wipe its result, or take its relay from its waiter.
-- _store._replace lists both (_store._own_keys).
UPDATE {prefix}.oban_jobs AS j SET
  args = coalesce(r.args, j.args),
  max_attempts = coalesce(r.max_attempts, j.max_attempts),
  meta = CASE WHEN r.meta IS NULL THEN j.meta
    ELSE (r.meta - %(dropped)s::text[]) || coalesce(
      (SELECT jsonb_object_agg(e.key, e.value) FROM jsonb_each(j.meta) AS e
       WHERE e.key = ANY(%(kept)s::text[])), '{}') END,
  priority = coalesce(r.priority, j.priority),
  queue = coalesce(r.queue, j.queue),
  tags = coalesce(r.tags, j.tags),
  scheduled_at = coalesce(r.scheduled_at, j.scheduled_at),
  state = CASE
    WHEN r.scheduled_at IS NULL OR j.state NOT IN ('available', 'scheduled') THEN j.state
    WHEN r.scheduled_at > timezone('UTC', now()) THEN 'scheduled'
    ELSE 'available' END::{prefix}.oban_job_state
FROM jsonb_to_record(%(changes)s::jsonb) AS r(
  args jsonb, max_attempts int, meta jsonb, priority int, queue text, tags text[],
  scheduled_at timestamp
)
WHERE j.id = %(id)s
RETURNING {job}

-- name: claim_candidates
-- A fragment, "{claim_candidates}": claim the jobs of the "candidates" CTE for this producer.
UPDATE {prefix}.oban_jobs AS j
SET state = 'executing',
    attempt = j.attempt + 1,
    attempted_at = timezone('UTC', now()),
    attempted_by = ARRAY[%(node)s::text, %(producer)s::text]
-- ANY(ARRAY(...)) probes the primary key: a join may scan the table on stale statistics.
WHERE j.id = ANY(ARRAY(SELECT id FROM candidates))
RETURNING {job}

-- name: fetch_jobs
-- Claim up to %(demand)s available jobs of one queue for this producer.
WITH candidates AS (
  SELECT id FROM {prefix}.oban_jobs
  WHERE state = 'available' AND queue = %(queue)s AND attempt < max_attempts
  ORDER BY priority, scheduled_at, id
  LIMIT %(demand)s
  FOR UPDATE SKIP LOCKED
)
{claim_candidates}

-- name: claim_one_of
-- Claim the next of the jobs %(ids)s that is still available (testing's drain_queue: one job
-- at a time, of those available when its round began).
WITH candidates AS (
  SELECT id FROM {prefix}.oban_jobs
  WHERE id = ANY(%(ids)s::bigint[]) AND state = 'available' AND attempt < max_attempts
  ORDER BY priority, scheduled_at, id
  LIMIT 1
  FOR UPDATE SKIP LOCKED
)
{claim_candidates}

-- name: ack_jobs
-- Record the outcomes of finished jobs in one statement. The fence (still executing, same
-- attempted_at) stops a stale ack from overwriting a job that was rescued and run again.
-- Relay notices go out in the same statement, only for rows actually updated. An ack carries
-- none for a relay waiting on the node writing it: that node hands the outcome over itself.
WITH acks AS (
  SELECT * FROM jsonb_to_recordset(%(acks)s::jsonb) AS a(
    id bigint, attempted_at timestamp, state text, schedule_in float8, error jsonb, meta jsonb,
    extra_attempts int, notice text
  )
), updated AS (
  UPDATE {prefix}.oban_jobs AS j SET
    state = a.state::{prefix}.oban_job_state,
    completed_at = CASE WHEN a.state = 'completed'
                        THEN timezone('UTC', now()) ELSE j.completed_at END,
    discarded_at = CASE WHEN a.state = 'discarded'
                        THEN timezone('UTC', now()) ELSE j.discarded_at END,
    cancelled_at = CASE WHEN a.state = 'cancelled'
                        THEN timezone('UTC', now()) ELSE j.cancelled_at END,
    scheduled_at = CASE WHEN a.schedule_in IS NULL THEN j.scheduled_at
                        ELSE timezone('UTC', now()) + make_interval(secs => a.schedule_in) END,
    errors = CASE WHEN a.error IS NULL THEN j.errors ELSE array_append(j.errors, a.error) END,
    meta = CASE WHEN a.meta IS NULL THEN j.meta ELSE coalesce(j.meta, '{}'::jsonb) || a.meta END,
    max_attempts = j.max_attempts + a.extra_attempts
  FROM acks AS a
  WHERE j.id = a.id AND j.state = 'executing' AND j.attempted_at = a.attempted_at
  RETURNING j.id, a.notice
), notified AS (
  SELECT pg_notify(%(relay_channel)s, notice) FROM updated WHERE notice IS NOT NULL
)
SELECT id FROM updated WHERE (SELECT count(*) FROM notified) >= 0

-- name: stage_jobs
-- Make due scheduled/retryable jobs available and wake the producers of their queues.
WITH due AS (
  SELECT id FROM {prefix}.oban_jobs
  WHERE state IN ('scheduled', 'retryable') AND scheduled_at <= timezone('UTC', now())
  ORDER BY scheduled_at, id
  LIMIT %(limit)s
  FOR UPDATE SKIP LOCKED
), staged AS (
  UPDATE {prefix}.oban_jobs AS j SET state = 'available'
  FROM due WHERE j.id = due.id
  RETURNING j.queue
), notified AS (
  SELECT pg_notify(%(channel)s, json_build_object('queue', queue)::text)
  FROM (SELECT DISTINCT queue FROM staged) AS q
)
SELECT count(*) FROM staged WHERE (SELECT count(*) FROM notified) >= 0

-- name: get_job
-- One job by id.
SELECT {job} FROM {prefix}.oban_jobs AS j WHERE j.id = %(id)s

-- name: get_relay_states
-- What the relay poller needs of pending relays' jobs: state, errors, meta.
SELECT id, state::text, errors, meta FROM {prefix}.oban_jobs WHERE id = ANY(%(ids)s::bigint[])

-- name: retry_job
-- Make a finished or waiting job available again, granting one more attempt if needed. A
-- workflow step with deps goes back to waiting for them (suspended), and its workflow is
-- returned for the caller to release it; a suspended step is left waiting.
WITH retried AS (
  UPDATE {prefix}.oban_jobs AS j SET
    state = (CASE WHEN j.meta ? 'workflow_id' AND j.meta->'deps' <> '[]'::jsonb
                  THEN 'suspended' ELSE 'available' END)::{prefix}.oban_job_state,
    scheduled_at = timezone('UTC', now()),
    max_attempts = greatest(j.max_attempts, j.attempt + 1),
    completed_at = NULL, discarded_at = NULL, cancelled_at = NULL
  WHERE j.id = %(id)s AND j.state NOT IN ('available', 'executing', 'suspended')
  RETURNING j.queue, j.state, j.meta->>'workflow_id' AS workflow_id
), notified AS (
  SELECT pg_notify(%(channel)s, json_build_object('queue', queue)::text)
  FROM retried WHERE state = 'available'
)
SELECT CASE WHEN state = 'suspended' THEN workflow_id END FROM retried
WHERE (SELECT count(*) FROM notified) >= 0

-- name: cancel_jobs
-- Cancel unfinished jobs, executing ones included (their nodes are signalled to stop them, and
-- their late acks are fenced out; the claim's attempted_at names the run to stop). Relayed
-- jobs' waiters are told in the same statement.
WITH target AS (
  SELECT id, state, attempted_at FROM {prefix}.oban_jobs
  WHERE id = ANY(%(ids)s::bigint[]) AND state NOT IN ('completed', 'discarded', 'cancelled')
  FOR UPDATE
), cancelled AS (
  UPDATE {prefix}.oban_jobs AS j SET
    state = 'cancelled',
    cancelled_at = timezone('UTC', now()),
    errors = array_append(j.errors, jsonb_build_object(
      'at', timezone('UTC', now()), 'attempt', j.attempt, 'error', %(reason)s::text))
  FROM target AS t
  WHERE j.id = t.id
  RETURNING j.id, j.meta
), notified AS (
  SELECT pg_notify(%(relay_channel)s, json_build_object(
    'ref', meta->>'relay', 'id', id, 'state', 'cancelled',
    -- Cut: a notice must stay under PostgreSQL's 8,000 bytes (the row keeps the whole reason).
    'reason', left(%(reason)s::text, 1000))::text)
  FROM cancelled WHERE meta ? 'relay'
)
SELECT t.id, t.state::text, t.attempted_at FROM target AS t
WHERE (SELECT count(*) FROM notified) >= 0

-- name: workflow_batch_ids
-- The workflows and batches of the given jobs, which finished without an ack to settle them.
SELECT DISTINCT meta->>'workflow_id', meta->>'batch_id' FROM {prefix}.oban_jobs
WHERE id = ANY(%(ids)s::bigint[]) AND (meta ? 'workflow_id' OR meta ? 'batch_id')

-- name: heartbeat_producers
-- Record that this node's producers are alive, with their state for cluster-wide checks.
INSERT INTO {prefix}.trioban_producers AS p (uuid, node, queue, meta)
SELECT r.uuid, r.node, r.queue, r.meta
FROM jsonb_to_recordset(%(producers)s::jsonb) AS r(uuid uuid, node text, queue text, meta jsonb)
ON CONFLICT (uuid) DO UPDATE SET updated_at = timezone('UTC', now()), meta = excluded.meta

-- name: delete_producers
-- Forget producers that stopped cleanly.
DELETE FROM {prefix}.trioban_producers WHERE uuid = ANY(%(uuids)s::uuid[])

-- name: live_producers
-- Producers that heartbeated within %(after)s seconds, for check_all_queues.
SELECT node, queue, meta FROM {prefix}.trioban_producers
WHERE updated_at >= timezone('UTC', now()) - make_interval(secs => %(after)s)
ORDER BY queue, node

-- name: elect_leader
-- Take or renew the lease of leadership for instance %(name)s. A row comes back only when
-- this peer holds the lease: it was free, expired, or already ours.
INSERT INTO {prefix}.oban_peers AS p (name, node, started_at, expires_at)
VALUES (%(name)s, %(node)s, timezone('UTC', now()),
        timezone('UTC', now()) + make_interval(secs => %(ttl)s))
ON CONFLICT (name) DO UPDATE SET
  node = excluded.node,
  started_at = CASE WHEN p.node = excluded.node THEN p.started_at ELSE excluded.started_at END,
  expires_at = excluded.expires_at
WHERE p.node = excluded.node OR p.expires_at < timezone('UTC', now())
RETURNING node

-- name: resign_leader
-- Give up the lease so another peer takes over at once.
DELETE FROM {prefix}.oban_peers WHERE name = %(name)s AND node = %(node)s

-- name: rescue_jobs
-- Executing jobs that started more than %(after)s seconds ago and that no live producer vouches
-- for go back to available, or to discarded when out of attempts. A producer vouches for a job
-- while it heartbeats and lists the job as running or as acking (finished, its ack still being
-- written): a node that died vouches for nothing, and
-- neither does a live node for a job it finished whose ack a PostgreSQL crash lost. A job
-- running on a live node is never touched, however long it runs.
-- A producer is judged by the larger of %(after)s and its own rescue_after (a node may
-- heartbeat less often than the leader; it vouches for the jobs it claimed within that time
-- too), and only if this peer has reached the database for that long (%(steady)s seconds):
-- after an outage, a live node needs that time to heartbeat again.
WITH orphans AS (
  SELECT j.id FROM {prefix}.oban_jobs AS j
  WHERE j.state = 'executing'
    AND j.attempted_at < timezone('UTC', now()) - make_interval(secs => %(after)s)
    AND NOT EXISTS (
      SELECT 1 FROM {prefix}.trioban_producers AS p
      CROSS JOIN LATERAL (SELECT timezone('UTC', now())
        - make_interval(secs => greatest(%(after)s, (p.meta->>'rescue_after')::float8)) AS since,
        greatest(%(after)s, (p.meta->>'rescue_after')::float8) > %(steady)s AS unsure) AS own
      WHERE p.uuid::text = j.attempted_by[2]
        AND (p.updated_at >= own.since OR own.unsure)
        AND (p.meta->'running' @> to_jsonb(j.id) OR p.meta->'acking' @> to_jsonb(j.id)
             OR j.attempted_at >= own.since))
  ORDER BY j.id
  LIMIT %(limit)s
  FOR UPDATE SKIP LOCKED
), rescued AS (
  UPDATE {prefix}.oban_jobs AS j
  SET state = CASE WHEN j.attempt >= j.max_attempts THEN 'discarded'
                   ELSE 'available' END::{prefix}.oban_job_state,
      discarded_at = CASE WHEN j.attempt >= j.max_attempts THEN timezone('UTC', now()) END,
      errors = array_append(j.errors, jsonb_build_object(
        'at', timezone('UTC', now()), 'attempt', j.attempt,
        'error', 'rescued: the node running it (' || coalesce(j.attempted_by[1], '?')
                 || ') stopped heartbeating'))
  WHERE j.id = ANY(ARRAY(SELECT id FROM orphans))
  RETURNING j.id, j.queue, j.state, j.meta, j.errors
), woken AS (
  SELECT pg_notify(%(insert_channel)s, json_build_object('queue', queue)::text)
  FROM (SELECT DISTINCT queue FROM rescued WHERE state = 'available') AS q
), notified AS (
  SELECT pg_notify(%(relay_channel)s, json_build_object(
    'ref', meta->>'relay', 'id', id, 'state', 'discarded',
    'reason', left(errors[array_length(errors, 1)]->>'error', 1000))::text)
  FROM rescued WHERE state = 'discarded' AND meta ? 'relay'
)
SELECT r.id, r.state::text FROM rescued AS r
WHERE (SELECT count(*) FROM woken) + (SELECT count(*) FROM notified) >= 0

-- name: forget_producers
-- Drop the rows of producers that stopped heartbeating long ago: ten times the larger of
-- %(after)s and their own rescue_after, once this peer has reached the database for that long.
DELETE FROM {prefix}.trioban_producers
WHERE updated_at < timezone('UTC', now())
    - make_interval(secs => 10 * greatest(%(after)s, (meta->>'rescue_after')::float8))
  AND greatest(%(after)s, (meta->>'rescue_after')::float8) <= %(steady)s

-- name: prune_jobs
-- Delete finished jobs older than %(max_age)s seconds: up to %(limit)s outside batches and
-- workflows, the whole batches (callback jobs included) among the next page of %(limit)s batch
-- rows, and the whole workflows among the next page of %(limit)s workflow rows (see below).
-- A batch goes only once every one of its rows is finished and old, in one statement: its
-- callbacks are decided by counting its rows, and its callback rows hold the keys that enqueue
-- each callback once, so pruning part of a batch would change which callbacks fire.
-- A workflow goes the same way: a step still to run reads its deps' results, and new steps
-- may be appended with deps on finished ones. A job in both goes with its batch, once its
-- workflow could go too. The workflows of the buckets not in %(workflow_buckets)s (being
-- appended to) stay.
-- A cron job goes only past %(cron_max_age)s: its row holds the key that lets its slot run
-- once, and a clock change repeating the slot, or a catch-up, must still find it.
-- Returns how many rows went, and where the batch page and the workflow page ended.
WITH cutoff AS (
  SELECT timezone('UTC', now()) - make_interval(secs => %(max_age)s) AS at,
         timezone('UTC', now()) - make_interval(secs => %(cron_max_age)s) AS cron_at
), loose AS (
  SELECT j.id FROM {prefix}.oban_jobs AS j CROSS JOIN cutoff AS c
  WHERE j.state IN ('completed', 'cancelled', 'discarded')
    AND coalesce(j.completed_at, j.cancelled_at, j.discarded_at, j.scheduled_at)
        < CASE WHEN j.meta ? 'cron' THEN c.cron_at ELSE c.at END
    AND NOT coalesce(j.meta ? 'batch_id' OR j.meta ? 'workflow_id', false)
  LIMIT %(limit)s
  FOR UPDATE OF j SKIP LOCKED
), batch_page AS (
  -- The next %(limit)s batch rows in batch-id order after %(batch_after)s (read along the
  -- batch index): a run costs a page, not a pass over every batch, and each cycle of pages
  -- reaches every batch however many there are. A batch the page ends within is still
  -- judged and deleted whole, and the next page starts after it.
  SELECT j.meta->>'batch_id' AS batch_id FROM {prefix}.oban_jobs AS j
  WHERE j.meta ? 'batch_id' AND j.meta->>'batch_id' > %(batch_after)s
  ORDER BY 1
  LIMIT %(limit)s
), prunable_batches AS (
  -- The page's batches none of whose rows is unfinished or recent: one probe of the batch
  -- index each (LATERAL; an anti-join would be planned as a scan of every batch).
  SELECT b.batch_id
  FROM (SELECT DISTINCT batch_id FROM batch_page) AS b CROSS JOIN cutoff AS c
  LEFT JOIN LATERAL (
    SELECT 1 AS found FROM {prefix}.oban_jobs AS r
    WHERE r.meta ? 'batch_id' AND r.meta->>'batch_id' = b.batch_id
      AND (r.state NOT IN ('completed', 'cancelled', 'discarded')
           OR coalesce(r.completed_at, r.cancelled_at, r.discarded_at, r.scheduled_at) >= c.at)
    LIMIT 1
  ) AS unfinished ON true
  LEFT JOIN LATERAL (
    -- A step of a workflow still running, or being appended to (its bucket held), keeps its
    -- batch: the steps to come read its result.
    SELECT 1 AS found FROM {prefix}.oban_jobs AS s
    WHERE s.meta ? 'batch_id' AND s.meta->>'batch_id' = b.batch_id AND s.meta ? 'workflow_id'
      AND (NOT hashtext(s.meta->>'workflow_id') & 15 = ANY(%(workflow_buckets)s::int[])
           OR EXISTS (
             SELECT 1 FROM {prefix}.oban_jobs AS r
             WHERE r.meta ? 'workflow_id' AND r.meta->>'workflow_id' = s.meta->>'workflow_id'
               AND (r.state NOT IN ('completed', 'cancelled', 'discarded')
                    OR coalesce(r.completed_at, r.cancelled_at, r.discarded_at, r.scheduled_at)
                       >= c.at)))
    LIMIT 1
  ) AS running_workflow ON true
  WHERE unfinished.found IS NULL AND running_workflow.found IS NULL
), workflow_page AS (
  -- The next %(limit)s workflow rows in id order after %(workflow_after)s (read along the
  -- workflow index): a run costs a page, not a pass over every workflow, and each cycle of
  -- pages reaches every workflow however many there are.
  SELECT j.meta->>'workflow_id' AS workflow_id FROM {prefix}.oban_jobs AS j
  WHERE j.meta ? 'workflow_id' AND j.meta->>'workflow_id' > %(workflow_after)s
  ORDER BY 1
  LIMIT %(limit)s
), prunable_workflows AS (
  -- The page's workflows none of whose steps is unfinished or recent: one probe of the
  -- workflow index each (LATERAL; an anti-join would be planned as a scan of every workflow).
  SELECT w.workflow_id
  FROM (SELECT DISTINCT workflow_id FROM workflow_page) AS w CROSS JOIN cutoff AS c
  LEFT JOIN LATERAL (
    SELECT 1 AS found FROM {prefix}.oban_jobs AS r
    WHERE r.meta ? 'workflow_id' AND r.meta->>'workflow_id' = w.workflow_id
      AND (r.state NOT IN ('completed', 'cancelled', 'discarded')
           OR coalesce(r.completed_at, r.cancelled_at, r.discarded_at, r.scheduled_at) >= c.at)
    LIMIT 1
  ) AS unfinished ON true
  WHERE unfinished.found IS NULL
    AND hashtext(w.workflow_id) & 15 = ANY(%(workflow_buckets)s::int[])
), loose_deleted AS (
  DELETE FROM {prefix}.oban_jobs AS j
  WHERE j.id = ANY(ARRAY(SELECT id FROM loose))
  RETURNING j.id
), batches_deleted AS (
  -- The state is rechecked under the row lock: a job retried meanwhile stays.
  DELETE FROM {prefix}.oban_jobs AS j
  WHERE j.meta ? 'batch_id' AND j.state IN ('completed', 'cancelled', 'discarded')
    AND j.meta->>'batch_id' = ANY(ARRAY(SELECT batch_id FROM prunable_batches))
  RETURNING j.id
), workflows_deleted AS (
  DELETE FROM {prefix}.oban_jobs AS j
  WHERE j.meta ? 'workflow_id' AND NOT j.meta ? 'batch_id'
    AND j.state IN ('completed', 'cancelled', 'discarded')
    AND j.meta->>'workflow_id' = ANY(ARRAY(SELECT workflow_id FROM prunable_workflows))
  RETURNING j.id
)
SELECT (SELECT count(*) FROM loose_deleted) + (SELECT count(*) FROM batches_deleted)
    + (SELECT count(*) FROM workflows_deleted),
  (SELECT max(batch_id) FROM batch_page), (SELECT count(*) FROM batch_page),
  (SELECT max(workflow_id) FROM workflow_page), (SELECT count(*) FROM workflow_page)

-- name: release_workflow_jobs
-- Settle the held (suspended) jobs of the given workflows whose deps allow it: cancelled when
-- a dep was cancelled or discarded and the job doesn't ignore that, else released (available,
-- or scheduled if it was built for later) once every dep finished. A dep row that is gone was
-- pruned, so it had finished. "state = 'suspended'" is rechecked under the row lock: of two
-- nodes settling the same job at once, one does it.
-- Each held row's meta is read once (MATERIALIZED: a fan-in's meta lists every dep), and each
-- dep is one probe of the workflow index (LATERAL): a join would be planned for far more rows
-- than deps have and scan every workflow's jobs.
WITH held AS MATERIALIZED (
  SELECT j.id, j.meta->>'workflow_id' AS workflow_id, j.meta->'deps' AS deps,
    coalesce((j.meta->>'ignore_cancelled')::boolean, false) AS ignore_cancelled,
    coalesce((j.meta->>'ignore_discarded')::boolean, false) AS ignore_discarded
  FROM {prefix}.oban_jobs AS j
  WHERE j.state = 'suspended' AND j.meta ? 'workflow_id'
    AND j.meta->>'workflow_id' = ANY(%(workflows)s::text[])
), verdicts AS (
  SELECT h.id,
    bool_and(d.state IS NULL OR d.state IN ('completed', 'cancelled', 'discarded')) AS all_done,
    string_agg(dep.name || ' ' || d.state::text, ', ') FILTER (WHERE
      (d.state = 'cancelled' AND NOT h.ignore_cancelled)
      OR (d.state = 'discarded' AND NOT h.ignore_discarded)
    ) AS failed
  FROM held AS h
  CROSS JOIN LATERAL jsonb_array_elements_text(h.deps) AS dep(name)
  LEFT JOIN LATERAL (
    SELECT d.state FROM {prefix}.oban_jobs AS d
    WHERE d.meta ? 'workflow_id' AND d.meta->>'workflow_id' = h.workflow_id
      AND d.meta->>'name' = dep.name
    OFFSET 0  -- keeps the subquery a probe: PostgreSQL would flatten it back into a join
  ) AS d ON true
  GROUP BY h.id
), settled AS (
  UPDATE {prefix}.oban_jobs AS j SET
    state = (CASE WHEN v.failed IS NOT NULL THEN 'cancelled'
                  WHEN j.scheduled_at > timezone('UTC', now()) THEN 'scheduled'
                  ELSE 'available' END)::{prefix}.oban_job_state,
    cancelled_at = CASE WHEN v.failed IS NOT NULL THEN timezone('UTC', now()) END,
    errors = CASE WHEN v.failed IS NULL THEN j.errors ELSE array_append(j.errors,
      jsonb_build_object('at', timezone('UTC', now()), 'attempt', j.attempt,
                         'error', 'upstream failed: ' || v.failed)) END
  FROM verdicts AS v
  WHERE j.id = v.id AND j.state = 'suspended' AND (v.failed IS NOT NULL OR v.all_done)
  RETURNING j.id, j.queue, j.state, j.meta, j.errors
), woken AS (
  SELECT pg_notify(%(insert_channel)s, json_build_object('queue', queue)::text)
  FROM (SELECT DISTINCT queue FROM settled WHERE state = 'available') AS q
), notified AS (
  SELECT pg_notify(%(relay_channel)s, json_build_object(
    'ref', meta->>'relay', 'id', id, 'state', 'cancelled',
    'reason', left(errors[array_length(errors, 1)]->>'error', 1000))::text)
  FROM settled WHERE state = 'cancelled' AND meta ? 'relay'
)
SELECT s.id, s.state::text, s.meta->>'workflow_id' FROM settled AS s
WHERE (SELECT count(*) FROM woken) + (SELECT count(*) FROM notified) >= 0

-- name: held_workflows
-- The next page of workflows with held jobs, in id order after %(after)s, for the leader's
-- sweep. Paging, not "any %(limit)s of them", is what lets each cycle of pages reach every
-- workflow however many wait (checking which need settling costs a join per held job).
SELECT DISTINCT meta->>'workflow_id' FROM {prefix}.oban_jobs
WHERE state = 'suspended' AND meta ? 'workflow_id' AND meta->>'workflow_id' > %(after)s
ORDER BY 1
LIMIT %(limit)s

-- name: recent_batches
-- The next page of batches with a job finished in the last %(window)s seconds, in id order
-- after %(after)s, for the leader's sweep (their callbacks are unique jobs: checking a batch
-- again enqueues nothing twice).
SELECT DISTINCT meta->>'batch_id' FROM {prefix}.oban_jobs
WHERE meta ? 'batch_id' AND NOT meta ? 'callback' AND meta->>'batch_id' > %(after)s
  AND state IN ('completed', 'cancelled', 'discarded')
  AND coalesce(completed_at, cancelled_at, discarded_at)
      > timezone('UTC', now()) - make_interval(secs => %(window)s)
ORDER BY 1
LIMIT %(limit)s

-- name: workflow_jobs
-- The steps of one workflow, optionally only the named ones.
SELECT j.meta->>'name', j.state::text, j.worker, j.meta->'result'
FROM {prefix}.oban_jobs AS j
WHERE j.meta ? 'workflow_id' AND j.meta->>'workflow_id' = %(workflow_id)s
  AND (%(names)s::text[] IS NULL OR j.meta->>'name' = ANY(%(names)s::text[]))
ORDER BY j.id

-- name: lock_workflow_id
-- Before a new workflow is inserted: hold its id until the transaction ends, so two inserts
-- of the same id can't both find it free (workflow_exists runs next, with a fresh snapshot).
SELECT pg_advisory_xact_lock(hashtextextended('trioban workflow ' || %(prefix)s || ' '
                                              || %(workflow_id)s, 0))

-- name: hold_workflow_steps
-- Before steps are appended to a workflow: hold its bucket (one of 16, by the id's hash,
-- shared) until the transaction ends. The pruner skips the workflows of a bucket held
-- (lock_prunable_workflows), so no step goes while an append reads it as a dep.
SELECT pg_advisory_xact_lock_shared(hashtext('trioban workflows ' || %(prefix)s),
                                    hashtext(%(workflow_id)s) & 15)

-- name: lock_prunable_workflows
-- The pruner takes the workflow buckets no append holds (see hold_workflow_steps) until its
-- transaction ends, and prunes only their workflows: an append then waits for the prune, and
-- reads the steps it left. Never waits: a bucket held is skipped this run.
SELECT coalesce(array_agg(b), '{}'::int[]) FROM generate_series(0, 15) AS b
WHERE pg_try_advisory_xact_lock(hashtext('trioban workflows ' || %(prefix)s), b)

-- name: workflow_exists
-- Whether a workflow id is in use: a new workflow under it would mix its steps with those.
SELECT EXISTS (
  SELECT 1 FROM {prefix}.oban_jobs AS j
  WHERE j.meta ? 'workflow_id' AND j.meta->>'workflow_id' = %(workflow_id)s
)

-- name: workflow_options
-- The workflow-wide options a workflow was inserted with (appended steps inherit them).
SELECT j.meta->'workflow_options' FROM {prefix}.oban_jobs AS j
WHERE j.meta ? 'workflow_id' AND j.meta->>'workflow_id' = %(workflow_id)s
  AND j.meta ? 'workflow_options'
LIMIT 1

-- name: batch_progress
-- Counts of the given batches' jobs (callbacks excluded), with one job's meta for the
-- callback settings every job of a batch carries.
WITH progress AS (
  SELECT j.meta->>'batch_id' AS batch_id,
    count(*) AS total,
    count(*) FILTER (WHERE j.state = 'completed') AS completed,
    count(*) FILTER (WHERE j.state = 'cancelled') AS cancelled,
    count(*) FILTER (WHERE j.state = 'discarded') AS discarded,
    -- Attempted: a first attempt has ended (one still executing hasn't), or it finished.
    count(*) FILTER (WHERE (j.attempt > 0 AND j.state <> 'executing') OR j.attempt > 1
                     OR j.state IN ('completed', 'cancelled', 'discarded')) AS attempted,
    min(j.id) AS first_id
  FROM {prefix}.oban_jobs AS j
  WHERE j.meta ? 'batch_id' AND j.meta->>'batch_id' = ANY(%(batches)s::text[])
    AND NOT j.meta ? 'callback'
  GROUP BY 1
)
SELECT p.batch_id, p.total, p.completed, p.cancelled, p.discarded, p.attempted, f.meta
FROM progress AS p JOIN {prefix}.oban_jobs AS f ON f.id = p.first_id

-- name: batch_states
-- Jobs of one batch by state (callbacks excluded).
SELECT state::text, count(*) FROM {prefix}.oban_jobs
WHERE meta ? 'batch_id' AND meta->>'batch_id' = %(batch_id)s AND NOT meta ? 'callback'
GROUP BY 1

-- name: make_due
-- Testing (drain_queue with_scheduled): a queue's scheduled and retryable jobs, due now, but
-- those to skip (that snoozed in this drain).
UPDATE {prefix}.oban_jobs SET state = 'available', scheduled_at = timezone('UTC', now())
WHERE queue = %(queue)s AND state IN ('scheduled', 'retryable')
  AND NOT id = ANY(%(skip)s::bigint[])

-- name: enqueued_jobs
-- Testing (assert_enqueued): jobs waiting to run (a workflow step waiting on its deps too) that
-- match the filters; args and meta match by containment, so a partial object matches.
SELECT {job} FROM {prefix}.oban_jobs AS j
WHERE j.state IN ('available', 'scheduled', 'retryable', 'suspended')
  AND (%(worker)s::text IS NULL OR j.worker = %(worker)s)
  AND (%(queue)s::text IS NULL OR j.queue = %(queue)s)
  AND j.args @> %(args)s::jsonb AND coalesce(j.meta, '{}'::jsonb) @> %(meta)s::jsonb
ORDER BY j.id

-- name: queue_states
-- Jobs per queue and state, for `trioban status`.
SELECT queue, state::text, count(*) FROM {prefix}.oban_jobs GROUP BY 1, 2 ORDER BY 1, 2

-- name: listed_jobs
-- A fragment, "{listed_jobs}": the jobs matching the optional filters of `trioban jobs`, newest
-- first, as "j" (a NULL limit: all of them).
FROM {prefix}.oban_jobs AS j
WHERE (%(ids)s::bigint[] IS NULL OR j.id = ANY(%(ids)s::bigint[]))
  AND (%(state)s::text IS NULL OR j.state::text = %(state)s)
  AND (%(queue)s::text IS NULL OR j.queue = %(queue)s)
  AND (%(worker)s::text IS NULL OR j.worker = %(worker)s)
ORDER BY j.id DESC
LIMIT %(limit)s

-- name: list_jobs
-- Jobs matching optional filters, newest first, for `trioban jobs list`.
SELECT {job}
{listed_jobs}

-- name: list_job_ids
-- The ids list_jobs lists (same filters, same order), for `jobs retry|cancel`.
SELECT j.id
{listed_jobs}

-- name: job_ids
-- Ids of the jobs in one state (optionally one queue), for bulk retry and cancel.
SELECT id FROM {prefix}.oban_jobs
WHERE state::text = %(state)s AND (%(queue)s::text IS NULL OR queue = %(queue)s)
ORDER BY id

-- name: notify
-- Publish payloads on one channel; notifications are delivered only when the transaction commits.
SELECT pg_notify(%(channel)s, payload) FROM unnest(%(payloads)s::text[]) AS payload

-- name: trioban_objects
-- How many of the objects uninstall.sql drops exist in the prefix, and whether its schema
-- exists, for `trioban uninstall`.
SELECT (SELECT count(*) FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
        WHERE n.nspname = %(prefix)s AND c.relkind IN ('r', 'p')
          AND c.relname IN ('oban_jobs', 'oban_peers', 'trioban_producers', 'trioban_schema'))
     + (SELECT count(*) FROM pg_type AS t JOIN pg_namespace AS n ON n.oid = t.typnamespace
        WHERE n.nspname = %(prefix)s AND t.typname = 'oban_job_state'),
  EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = %(prefix)s)

-- name: schema_version
-- The installed trioban schema version, or NULL.
SELECT version FROM {prefix}.trioban_schema WHERE component = 'trioban'
