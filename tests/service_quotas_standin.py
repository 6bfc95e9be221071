"""A stand-in for the Service Quotas API (AWS JSON 1.1 over HTTP), enough for `celebscan estimate`.

It answers ListServiceQuotas (the account's applied quotas) and ListAWSDefaultServiceQuotas (the
region's defaults) from two lists the test sets; boto3 reaches it through
``AWS_ENDPOINT_URL_SERVICE_QUOTAS``, the same code path as the real service.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TARGET_PREFIX = "ServiceQuotasV20190624."
CELEBRITIES = "Transactions per second per account for the Amazon Rekognition Image operation RecognizeCelebrities"


def quota(name: str, value: float) -> dict:
    return {"ServiceCode": "rekognition", "QuotaName": name, "Value": value, "Adjustable": True}


@dataclass
class ServiceQuotasStandIn:
    applied: list[dict] = field(default_factory=list)
    defaults: list[dict] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    def __enter__(self) -> ServiceQuotasStandIn:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
                operation = self.headers.get("X-Amz-Target", "").removeprefix(TARGET_PREFIX)
                standin.requests.append(operation)
                quotas = {"ListServiceQuotas": standin.applied, "ListAWSDefaultServiceQuotas": standin.defaults}
                if operation not in quotas or body.get("ServiceCode") != "rekognition":
                    return self._send(400, {"__type": "IllegalArgumentException", "Message": operation})
                self._send(200, {"Quotas": quotas[operation]})

            def _send(self, status: int, document: dict) -> None:
                data = json.dumps(document).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/x-amz-json-1.1")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
