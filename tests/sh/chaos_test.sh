#!/bin/sh
# The short chaos run (45 s) inside make test (make chaos runs it for 10 minutes):
# kill -9 of workers, nodes and the head under checked work.
cd "$(dirname "$0")/../.."
exec sh tests/chaos/chaos.sh "${CHAOS_SECONDS:-45}"
