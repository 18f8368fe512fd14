-- The same transaction with the task INSERT added (compare its latency average with app_txn.sql).
BEGIN;
INSERT INTO bench_users (email) VALUES ('x' || random()) RETURNING id;
INSERT INTO tasks (id, name, args) VALUES (gen_random_uuid(), 'bench.noop_async', '{"n":1}') RETURNING scheduled_at, created_at;
COMMIT;
