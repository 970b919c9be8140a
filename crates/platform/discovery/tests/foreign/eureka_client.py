"""py-eureka-client, unmodified, against the embedded registry's Eureka API: register
an instance, discover it and call it through discovery, then stop (cancel). Prints one
JSON line for tests/foreign_clients.rs to judge."""
import http.server
import json
import sys
import threading
import urllib.request

from py_eureka_client import eureka_client

registry = sys.argv[1]


class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"hello from python"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
port = server.server_address[1]
threading.Thread(target=server.serve_forever, daemon=True).start()

eureka_client.init(
    eureka_server=registry + "/eureka",
    app_name="py-inventory",
    instance_id=f"py-inventory-{port}",
    instance_host="127.0.0.1",
    instance_ip="127.0.0.1",
    instance_port=port,
    renewal_interval_in_secs=1,
    duration_in_secs=5,
)
# Discovery through the client's own cache of GET /eureka/apps (XML).
answer = eureka_client.do_service("PY-INVENTORY", "/hello")
# What a Consul client sees of the same instance.
with urllib.request.urlopen(f"{registry}/v1/health/service/py-inventory?passing") as r:
    consul_view = [e["Service"]["ID"] for e in json.load(r)]
eureka_client.stop()
with urllib.request.urlopen(f"{registry}/v1/health/service/py-inventory") as r:
    after = len(json.load(r))
print(json.dumps({"answer": answer, "port": port, "consul_view": consul_view, "after": after}))
