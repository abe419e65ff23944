"""A replica command for the node tests that need only its command line: it writes its
arguments as JSON to $ARGV_OUT, prints them (as vLLM prints its non-default arguments), and
exits with status 3 without serving."""

import json
import os
import sys

with open(os.environ["ARGV_OUT"], "w") as f:
    json.dump(sys.argv[1:], f)
print("args:", sys.argv[1:], flush=True)
sys.exit(3)
