#!/usr/bin/env bash
# Sourced by scripts/test.sh (never call exit here). Placeholder: filled in by the guest work.
:
