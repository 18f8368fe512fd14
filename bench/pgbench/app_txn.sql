-- The A1-outbox app transaction with no client library at all (see bench/outbox.py):
--   pgbench -h 127.0.0.1 -U postgres -n -M prepared -t 3000 -f bench/pgbench/app_txn.sql tasklib_bench
BEGIN;
INSERT INTO bench_users (email) VALUES ('x' || random()) RETURNING id;
COMMIT;
