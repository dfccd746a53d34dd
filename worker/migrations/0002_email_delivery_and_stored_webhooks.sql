-- Delivery state of outbox messages, and webhook events that the web platform stores
-- before it queues a `webhook:process` job for them.

-- `attempts` counts delivery attempts through the SMTP relay, `last_error` keeps the
-- reason of the latest failed one, and `message_id` is the Message-ID header sent.
ALTER TABLE email_outbox
    ADD COLUMN attempts   integer NOT NULL DEFAULT 0,
    ADD COLUMN last_error text,
    ADD COLUMN message_id text;

-- A stored event has no job yet and is not processed: the worker sets `job_id`,
-- `processed_at` and `result` when it applies the event.
ALTER TABLE webhook_events
    ALTER COLUMN job_id DROP NOT NULL,
    ALTER COLUMN processed_at DROP NOT NULL,
    ALTER COLUMN processed_at DROP DEFAULT,
    ADD COLUMN received_at timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN result text;

CREATE INDEX webhook_events_unprocessed_idx ON webhook_events (received_at)
    WHERE processed_at IS NULL;
