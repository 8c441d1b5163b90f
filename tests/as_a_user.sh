#!/usr/bin/env bash
# Runs a command (the suite) as on a user's machine that is not ours, and checks it left the
# project's .venv and the user's ~/.theano as they were:
#
#   bash tests/as_a_user.sh .venv/bin/python -m pytest -q
#
#   - a ~/.theanorc asking for float64 and the GPU (theanorc.example offers both), in a HOME of
#     its own that the command cannot write: read-only (a read-only bind mount in a mount
#     namespace of its own as root, where permissions do not stop writes; chmod otherwise);
#   - no proxy to lean on: no_proxy='*', http(s)_proxy unset (nothing may reach the network);
#   - before and after: a fingerprint of .venv and of the real ~/.theano (every path, size,
#     modification time and link target); a difference fails the run, naming what changed.
# CI runs the suite so.  WORLD_HOME=DIR uses DIR as that HOME instead (its .theanorc kept).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || { echo "usage: bash tests/as_a_user.sh COMMAND..." >&2; exit 2; }

listing() {   # every path below the folders given, with size, mtime and link target
  local folder
  for folder in "$@"; do
    [ -e "$folder" ] && find "$folder" -printf '%p %s %T@ %l\n'
  done | LC_ALL=C sort
}
real_theano=$HOME/.theano
before=$(mktemp) after=$(mktemp)
home=${WORLD_HOME:-$(mktemp -d)}
trap 'chmod -R u+w "$home" 2>/dev/null; [ -n "${WORLD_HOME:-}" ] || rm -rf "$home"; rm -f "$before" "$after"' EXIT
listing .venv "$real_theano" > "$before"
[ -f "$home/.theanorc" ] || printf '[global]\nfloatX = float64\ndevice = cuda\n' > "$home/.theanorc"

world=(env -u http_proxy -u https_proxy -u HTTP_PROXY -u HTTPS_PROXY no_proxy='*' NO_PROXY='*' HOME="$home")
status=0
if [ "$(id -u)" -eq 0 ] && unshare -m true 2>/dev/null; then
  "${world[@]}" unshare -m sh -c 'mount --bind "$HOME" "$HOME" && mount -o remount,ro,bind "$HOME" && exec "$@"' \
    sh "$@" || status=$?
else
  chmod -R a-w "$home"
  "${world[@]}" "$@" || status=$?
fi

listing .venv "$real_theano" > "$after"
if ! cmp -s "$before" "$after"; then
  echo "as_a_user.sh: the command changed .venv or $real_theano:" >&2
  diff "$before" "$after" | head -20 >&2 || true
  exit 1
fi
exit $status
