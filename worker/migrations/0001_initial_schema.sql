-- Tables the worker's jobs read and write.
--
-- NOTE: `orders` normally belongs to the web platform. CREATE TABLE IF NOT EXISTS leaves
-- an existing table alone, so on a database where the platform created `orders` first,
-- that table must have the columns id (text), status (text), updated_at and
-- processed_at (timestamptz) that `order:process` updates.

CREATE TABLE IF NOT EXISTS orders (
    id           text        PRIMARY KEY,
    status       text        NOT NULL DEFAULT 'pending',
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    processed_at timestamptz
);

CREATE INDEX IF NOT EXISTS orders_status_idx ON orders (status);

-- One row per completed job. A job's writes and its row here commit in one
-- transaction, so a job delivered twice applies its writes once.
CREATE TABLE processed_jobs (
    job_id       text        PRIMARY KEY,
    job_type     text        NOT NULL,
    worker       text        NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now()
);

-- Status changes made by `order:process`.
CREATE TABLE order_events (
    id          bigserial   PRIMARY KEY,
    order_id    text        NOT NULL,
    job_id      text        NOT NULL,
    from_status text        NOT NULL,
    to_status   text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX order_events_order_id_idx ON order_events (order_id);

-- Messages from `email:send`, waiting for delivery through the SMTP relay.
CREATE TABLE email_outbox (
    id         bigserial   PRIMARY KEY,
    job_id     text        NOT NULL UNIQUE,
    recipient  text        NOT NULL,
    subject    text        NOT NULL,
    body       text        NOT NULL,
    status     text        NOT NULL DEFAULT 'queued'
                           CHECK (status IN ('queued', 'sent', 'failed')),
    created_at timestamptz NOT NULL DEFAULT now(),
    sent_at    timestamptz
);

CREATE INDEX email_outbox_queued_idx ON email_outbox (created_at) WHERE status = 'queued';

-- Webhook deliveries handled by `webhook:process`.
CREATE TABLE webhook_events (
    id           bigserial   PRIMARY KEY,
    job_id       text        NOT NULL UNIQUE,
    source       text,
    event        text,
    payload      jsonb       NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now()
);
