#!/usr/bin/env python3
"""DynamoDB sink load figure (a measurement, not a timed test): conditional UpdateItems/s
against moto, the `sluice` binary (file source -> dynamodb sink, in_flight 16) vs a boto3 loop
of 16 threads sending the same conditional updates, same records, same server, same run.

    scripts/services.sh start moto
    /tmp/sluice-services/venv/bin/python benches/dynamodb-load.py [N] [path/to/sluice]

N (default 2000) distinct devices, one reading each, so nothing is coalesced. moto serializes
the calls at about 100/s on the 2-core box: read the figures as sluice vs the reference on the
same server, not as DynamoDB throughput. The sluice time includes process start.
"""
import concurrent.futures as cf
import json
import os
import subprocess
import sys
import tempfile
import time

import boto3

N = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
SLUICE = sys.argv[2] if len(sys.argv) > 2 else "target/debug/sluice"
ENDPOINT = os.environ.get("ENDPOINT", "http://127.0.0.1:5000")
os.environ.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_REGION="us-east-1")
ddb = boto3.client("dynamodb", endpoint_url=ENDPOINT, region_name="us-east-1")
tag = str(int(time.time()))
work = tempfile.mkdtemp(prefix="ddb-load-")
lines = [{"ts": 1767225600000 + i, "device_id": f"dev-{i:05}", "site": f"s{i % 7}",
          "temp": 20.5 + i * 0.01, "seq": i, "ok": i % 2 == 0, "status": f"s{i}"}
         for i in range(N)]
with open(os.path.join(work, "in.jsonl"), "w") as f:
    for line in lines:
        f.write(json.dumps(line) + "\n")


def create(table):
    ddb.create_table(TableName=table, BillingMode="PAY_PER_REQUEST",
                     AttributeDefinitions=[{"AttributeName": "device_id", "AttributeType": "S"}],
                     KeySchema=[{"AttributeName": "device_id", "KeyType": "HASH"}])


ref_table = "ref_" + tag
create(ref_table)


def update(line):
    ddb.update_item(
        TableName=ref_table, Key={"device_id": {"S": line["device_id"]}},
        UpdateExpression="SET #a0 = :a0, #a1 = :a1, #a2 = :a2, #a3 = :a3, #a4 = :a4, #t = :t, #ttl = :ttl",
        ConditionExpression="attribute_not_exists(#t) OR #t < :t",
        ExpressionAttributeNames={"#a0": "site", "#a1": "temp", "#a2": "seq", "#a3": "ok",
                                  "#a4": "status", "#t": "event_time", "#ttl": "ttl"},
        ExpressionAttributeValues={
            ":a0": {"S": line["site"]}, ":a1": {"N": repr(line["temp"])},
            ":a2": {"N": str(line["seq"])}, ":a3": {"BOOL": line["ok"]},
            ":a4": {"S": line["status"]}, ":t": {"N": str(line["ts"])},
            ":ttl": {"N": str(line["ts"] // 1000 + 7 * 86400)}})


started = time.time()
with cf.ThreadPoolExecutor(16) as pool:
    list(pool.map(update, lines))
ref = time.time() - started

sluice_table = "sluice_" + tag
create(sluice_table)
with open(os.path.join(work, "p.toml"), "w") as f:
    f.write(f'''
[sources.in]
type = "file"
path = "{work}/in.jsonl"
decode = {{ tags = ["device_id", "site"] }}

[sinks.state]
type = "dynamodb"
inputs = ["in"]
endpoint_url = "{ENDPOINT}"
region = "us-east-1"
table = "{sluice_table}"
ttl = "7d"
in_flight = 16
''')
started = time.time()
subprocess.run([SLUICE, "run", "--status-interval", "0s", os.path.join(work, "p.toml")], check=True)
took = time.time() - started
count = ddb.scan(TableName=sluice_table, Select="COUNT")["Count"]
assert count == N, f"sluice wrote {count} items of {N}"
print(f"N={N}: boto3 16 threads {N / ref:.0f} updates/s ({ref:.1f} s); "
      f"sluice in_flight 16 {N / took:.0f} updates/s ({took:.1f} s incl. process start); "
      f"ratio {ref / took:.2f}x")
