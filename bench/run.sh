#!/usr/bin/env bash
# The benchmark of issue 6, unattended: `make bench` (100k queue-scale form) or `bash bench/run.sh --full`.
# Needs smtp-source/smtp-sink/postfix (Debian's postfix package; installed here if missing, needs root),
# PostgreSQL at 127.0.0.1:5432 with trust auth and a `test` database (skipped with a note if absent).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

need_postfix() {
  for b in smtp-source smtp-sink postfix postconf; do
    command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || return 0
  done
  return 1
}

if need_postfix; then
  if [ "$(id -u)" != 0 ]; then
    echo "bench: postfix (smtp-source/smtp-sink) missing and not root; install it: apt-get install postfix" >&2
    exit 1
  fi
  echo "bench: installing Debian's postfix (for smtp-source, smtp-sink and a throwaway relay instance)"
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  echo "postfix postfix/mailname string bench.localdomain" | debconf-set-selections
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postfix >/dev/null
  # The package's own instance is not wanted: the benchmark starts its own with its own config dir.
  if [ -f /etc/postfix/main.cf ] && [ -d /var/spool/postfix ]; then
    postfix stop >/dev/null 2>&1 || true
  fi
fi
export PATH="$PATH:/usr/sbin:/usr/lib/postfix/sbin"

# py-spy for the profile section of RESULTS.md (the bench extra of pyproject.toml)
if ! command -v py-spy >/dev/null 2>&1 && [ ! -x "$(dirname "$PY")/py-spy" ]; then
  "$PY" -m pip install --quiet 'py-spy>=0.3.14' || echo "bench: py-spy could not be installed: no profile" >&2
fi

# premailer: the CSS inliner css-inline is measured against (bench/transform_choices.py)
"$PY" -c "import premailer" 2>/dev/null || "$PY" -m pip install --quiet 'premailer>=3.10' \
  || echo "bench: premailer could not be installed: its row is left out" >&2

exec "$PY" bench/bench.py "$@"
