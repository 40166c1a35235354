"""moto's server for the integration tests, plus a read-back endpoint for Timestream.

moto accepts Timestream WriteRecords but its timestream-query returns nothing, and its generic
/moto-api/data.json dump fails as soon as another service's state is inconsistent. So this
launcher runs moto in-process (ThreadedMotoServer on --port) and serves, on --dump-port,
  GET /timestream/<database>/<table>   the records stored in that table, as sent (JSON array;
                                       404 when the table does not exist)
for every account and region moto holds.

  python scripts/moto_server.py --host 127.0.0.1 --port 5000 --dump-port 5001
"""

import argparse
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

from moto.server import ThreadedMotoServer


def timestream_records(database, table):
    from moto.timestreamwrite.models import timestreamwrite_backends

    found = None
    for account_id in list(timestreamwrite_backends.keys()):
        regions = timestreamwrite_backends[account_id]
        for region in list(regions.keys()):
            db = regions[region].databases.get(database)
            if db is not None and table in db.tables:
                found = (found or []) + list(db.tables[table].records)
    return found


class Dump(BaseHTTPRequestHandler):
    def do_GET(self):
        parts = [unquote(p) for p in self.path.strip("/").split("/")]
        if len(parts) == 3 and parts[0] == "timestream":
            records = timestream_records(parts[1], parts[2])
            if records is None:
                self.reply(404, {"error": f"no table {parts[1]}.{parts[2]}"})
            else:
                self.reply(200, records)
        else:
            self.reply(404, {"error": "use /timestream/<database>/<table>"})

    def reply(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--dump-port", type=int, default=5001)
    args = parser.parse_args()
    server = ThreadedMotoServer(ip_address=args.host, port=args.port, verbose=False)
    server.start()
    ThreadingHTTPServer((args.host, args.dump_port), Dump).serve_forever()


if __name__ == "__main__":
    main()
