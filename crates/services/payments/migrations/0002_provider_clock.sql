-- When the simulated provider first started on this database: its outage windows
-- count from here, so a restart (a crash, `bazaar chaos`) does not replay them.
CREATE TABLE provider_clock (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    started_ms BIGINT NOT NULL
);
