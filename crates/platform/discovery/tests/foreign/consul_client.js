// The npm `consul` package (the guide's client), unmodified, against the embedded
// registry: register two instances with checks, discover the passing one, read the
// catalog, deregister. Prints one JSON line for tests/foreign_clients.rs to judge.
const http = require("http");
const Consul = require("consul");

const registry = new URL(process.argv[2]);
const consul = new Consul({ host: registry.hostname, port: registry.port });
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function main() {
  // The instance the HTTP check calls.
  const server = http.createServer((_, res) => res.end("ok"));
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  const port = server.address().port;

  await consul.agent.service.register({
    name: "node-inventory",
    id: "node-inventory-1",
    address: "127.0.0.1",
    port,
    tags: ["js", "v1"],
    meta: { runtime: "node" },
    check: { http: `http://127.0.0.1:${port}/health`, interval: "1s", timeout: "1s" },
  });
  // A second instance whose TCP check can never pass (nothing listens on port 1).
  await consul.agent.service.register({
    name: "node-inventory",
    id: "node-inventory-2",
    address: "127.0.0.1",
    port: 1,
    check: { tcp: "127.0.0.1:1", interval: "1s", timeout: "1s" },
  });

  let passing = [];
  for (let i = 0; i < 50; i++) {
    passing = await consul.health.service({ service: "node-inventory", passing: true });
    if (passing.length === 1) break;
    await sleep(200);
  }
  const all = await consul.health.service("node-inventory");
  const byTag = await consul.health.service({ service: "node-inventory", tag: "v1" });
  const catalog = await consul.catalog.service.list();
  const nodes = await consul.catalog.service.nodes("node-inventory");

  await consul.agent.service.deregister("node-inventory-1");
  await consul.agent.service.deregister({ id: "node-inventory-2" });
  const after = await consul.health.service("node-inventory");
  server.close();

  console.log(
    JSON.stringify({
      passing: passing.map((e) => e.Service.ID),
      passing_port: passing.map((e) => e.Service.Port),
      all: all.map((e) => e.Service.ID).sort(),
      by_tag: byTag.map((e) => e.Service.ID),
      check_statuses: all.flatMap((e) => e.Checks.map((c) => c.Status)).sort(),
      catalog_has_service: Object.prototype.hasOwnProperty.call(catalog, "node-inventory"),
      catalog_nodes: nodes.map((n) => n.ServiceID).sort(),
      after: after.length,
    }),
  );
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
