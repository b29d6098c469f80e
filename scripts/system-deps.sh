#!/usr/bin/env bash
# Installs the Debian packages that provide the given commands, only those not found already.
#   scripts/system-deps.sh PACKAGE[:COMMAND] ...
# PACKAGE alone is checked with `command -v PACKAGE`, PACKAGE:COMMAND with `command -v COMMAND`,
# PACKAGE:/PATH (a data package) by the path existing;
# PACKAGE: (nothing after the colon) is installed unconditionally: the caller has checked.
# Uses apt-get (with sudo when not root). Whatever is still missing afterwards is named on stderr;
# with CI set in the environment that is an error (exit 1), otherwise the caller goes on.
set -uo pipefail

missing() {  # the packages of "$@" whose command is not found
    local spec pkg cmd
    for spec in "$@"; do
        pkg=${spec%%:*}
        cmd=${spec#*:}
        if [[ $spec != *:* ]]; then cmd=$pkg; fi
        if [[ $cmd == /* ]]; then [[ -e $cmd ]] || echo "$pkg"; continue; fi
        if [[ -z $cmd ]] || ! command -v "$cmd" >/dev/null 2>&1; then echo "$pkg"; fi
    done
}

mapfile -t todo < <(missing "$@")
(( ${#todo[@]} )) || exit 0

sudo=()
if [[ $(id -u) != 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then sudo=(sudo); fi
fi
if command -v apt-get >/dev/null 2>&1 && { [[ $(id -u) == 0 ]] || (( ${#sudo[@]} )); }; then
    echo "system-deps: installing ${todo[*]}" >&2
    "${sudo[@]}" apt-get update -qq &&
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${todo[@]}" >&2
else
    echo "system-deps: no apt-get, or not root and no sudo: cannot install ${todo[*]}" >&2
fi

# Check again: a package: spec (unconditional) counts as installed when dpkg says so.
still=()
for spec in "$@"; do
    pkg=${spec%%:*}
    if [[ $spec == *: ]]; then
        dpkg -s "$pkg" >/dev/null 2>&1 || still+=("$pkg")
    else
        [[ -n $(missing "$spec") ]] && still+=("$pkg")
    fi
done
(( ${#still[@]} )) || exit 0
echo "system-deps: NOT INSTALLED: ${still[*]} -- install them yourself (apt-get install ${still[*]});" \
     "until then what needs them (tests, --compile) skips or fails" >&2
if [[ -n ${CI:-} ]]; then
    echo "system-deps: CI is set: stopping" >&2
    exit 1
fi
exit 0
