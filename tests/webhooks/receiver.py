"""A webhook receiver for tests/serve_webhooks.rs.

Verifies every request with the Standard Webhooks reference library from
PyPI (`standardwebhooks`), an implementation flashcall's authors did not
write. Listens on 127.0.0.1, port 0, and prints the port on its first line.

    WEBHOOK_SECRET=whsec_... python3 receiver.py LOG FAIL_FIRST ANSWER

Answers 500 to the first FAIL_FIRST verified requests, then ANSWER (such as
204 or 410); a request that does not verify gets 400. Every request is
appended to LOG as one JSON line: webhook-id, the answer, whether it
verified, and the event's type, data.id and data.status.
"""

import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks import Webhook

LOG, FAIL_FIRST, ANSWER = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
HOOK = Webhook(os.environ["WEBHOOK_SECRET"])
lock = threading.Lock()
seen = 0


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        global seen
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        headers = {k: v for k, v in self.headers.items()}
        entry = {"id": self.headers.get("webhook-id")}
        try:
            event = HOOK.verify(body, headers)
            entry.update(
                verified=True,
                content_type=self.headers.get("content-type"),
                type=event.get("type"),
                data_id=event.get("data", {}).get("id"),
                status=event.get("data", {}).get("status"),
            )
        except Exception as e:  # any failure to verify is the test's finding
            entry.update(verified=False, error=repr(e))
        with lock:
            if not entry["verified"]:
                answer = 400
            else:
                seen += 1
                answer = 500 if seen <= FAIL_FIRST else ANSWER
            entry["answer"] = answer
            with open(LOG, "a") as f:
                f.write(json.dumps(entry) + "\n")
        self.send_response(answer)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
