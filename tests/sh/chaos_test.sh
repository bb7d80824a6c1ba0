#!/bin/sh
# The short chaos run inside make test (make chaos runs it for 10 minutes):
# kill -9 of workers, nodes and the head under checked work.
cd "$(dirname "$0")/../.."
exec sh tests/chaos/chaos.sh "${CHAOS_SECONDS:-30}"
