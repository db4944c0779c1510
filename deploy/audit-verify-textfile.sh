#!/bin/sh
# Verify the audit log's hash chain and leave the result for node_exporter's textfile
# collector, where deploy/prometheus/alerts.yml's OptgateAuditChainBroken and
# OptgateAuditVerifyStale read it. Run it on a schedule on the gateway's host, e.g. hourly:
#
#   17 * * * *  optgate  OPTGATE_CONFIG=/etc/optgate/optgate.toml \
#                        /opt/optgate/deploy/audit-verify-textfile.sh /var/lib/node_exporter/textfile
#
# With the container image, let OPTGATE run the CLI inside it:
#
#   OPTGATE="docker exec optgate optgate" audit-verify-textfile.sh /var/lib/node_exporter/textfile
#
# `optgate audit verify` exits 0 when the chain is intact, 1 when it breaks (it prints the
# FILE:LINE, which goes to this script's stderr, e.g. cron's mail), and 2 when it cannot run.
# The metrics carry no PHI: an exit code and a time.
set -u

dir=${1:?usage: audit-verify-textfile.sh TEXTFILE_COLLECTOR_DIR}
optgate=${OPTGATE:-optgate}

# shellcheck disable=SC2086 # OPTGATE may be a command with arguments ("docker exec ...")
$optgate audit verify >&2
code=$?
failed=$([ "$code" -eq 0 ] && echo 0 || echo 1)

# Written beside the target and renamed, so the collector never reads half a file.
tmp="$dir/.optgate_audit_verify.prom.$$"
cat >"$tmp" <<EOF
# HELP optgate_audit_verify_failed 1 when the last optgate audit verify did not pass.
# TYPE optgate_audit_verify_failed gauge
optgate_audit_verify_failed $failed
# HELP optgate_audit_verify_exit_code Exit code of the last optgate audit verify (1: chain broken, 2: could not run).
# TYPE optgate_audit_verify_exit_code gauge
optgate_audit_verify_exit_code $code
# HELP optgate_audit_verify_last_run_timestamp_seconds When optgate audit verify last ran.
# TYPE optgate_audit_verify_last_run_timestamp_seconds gauge
optgate_audit_verify_last_run_timestamp_seconds $(date +%s)
EOF
mv "$tmp" "$dir/optgate_audit_verify.prom"
exit "$code"
