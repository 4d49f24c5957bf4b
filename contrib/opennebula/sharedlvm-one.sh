# sharedlvm-one.sh: the common part of the sharedlvm OpenNebula drivers (tm/ and
# datastore/). Sourced by every action script on the front-end, and sent as the head
# of the script each action runs on a host ("$SHAREDLVM_ONE_REMOTE HOST bash -s"), so
# it holds both sides: front-end functions (fe_*, remote, die) and host functions (h_*).
#
# Settings (environment, else remotes/etc/sharedlvm/sharedlvm.conf, else the default):
#   SHAREDLVM_ONE_REMOTE       command that runs "bash -s" on a host: ssh (default)
#   SHAREDLVM_ONE_BRIDGE_LIST  hosts for actions that name no host (DS actions when the
#                              datastore has no BRIDGE_LIST; undeployed VMs)
#   SHAREDLVM_ONE_STAGING      directory on a host for image transfers (/var/tmp)
#   SHAREDLVM_ONE_CLONE        linked (default) or full: VM disks of non-persistent images
#   SHAREDLVM_ONE_DOMAIN       sharedlvm domain when a datastore names none (default: the
#                              host's only attached domain)
#   SHAREDLVM_ONE_SUDO         how a host runs sharedlvm when the remote user is not root
#                              ("sudo -n")
#
# Everything here runs under "set -euo pipefail"; a failure is one line on stderr,
# "ERROR: <driver> <action>: <what>", and a non-zero exit.

# The functions here set variables their callers read (HOST, VMDIR, X, BRIDGE, ...).
# shellcheck disable=SC2034
set -euo pipefail

SLONE_UUID_RE='^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'

# ---------------------------------------------------------------------------------
# Both sides
# ---------------------------------------------------------------------------------

die() {
    echo "ERROR: ${SLONE_WHAT:+$SLONE_WHAT: }$*" >&2
    exit 1
}

info() {
    echo "INFO: ${SLONE_WHAT:+$SLONE_WHAT: }$*" >&2
}

warn() {
    echo "WARN: ${SLONE_WHAT:+$SLONE_WHAT: }$*" >&2
}

# pyjson JSON EXPR: EXPR evaluated with d = the parsed JSON; a list prints one item a
# line, None prints nothing, anything else str().
pyjson() {
    python3 -c '
import json, sys
d = json.loads(sys.argv[1])
r = eval(sys.argv[2])
if isinstance(r, (list, tuple)):
    for x in r:
        print(x)
elif r is not None:
    print(r)
' "$1" "$2" </dev/null
}

uuid5() {
    python3 -c 'import sys, uuid; print(uuid.uuid5(uuid.NAMESPACE_URL, "sharedlvm-one:" + sys.argv[1]))' "$1" </dev/null
}

# ---------------------------------------------------------------------------------
# Front-end side
# ---------------------------------------------------------------------------------

# fe_init DRIVER: settings, the library's own path, the action's name for messages.
fe_init() {
    SLONE_DRIVER=$1
    SLONE_ACTION=$(basename "$0")
    SLONE_WHAT="$SLONE_DRIVER $SLONE_ACTION"
    local conf="${SHAREDLVM_ONE_CONF:-$(dirname "$0")/../../etc/sharedlvm/sharedlvm.conf}"
    if [ -f "$conf" ]; then
        # the conf file only fills what the environment does not set
        local line key
        while IFS= read -r line || [ -n "$line" ]; do
            case "$line" in ''|'#'*) continue ;; esac
            key=${line%%=*}
            case "$key" in SHAREDLVM_ONE_*) ;; *) continue ;; esac
            if [ -z "${!key:-}" ]; then
                eval "$line"
            fi
        done < "$conf"
    fi
    : "${SHAREDLVM_ONE_REMOTE:=ssh}"
    : "${SHAREDLVM_ONE_BRIDGE_LIST:=}"
    : "${SHAREDLVM_ONE_STAGING:=/var/tmp}"
    : "${SHAREDLVM_ONE_CLONE:=linked}"
    : "${SHAREDLVM_ONE_DOMAIN:=}"
    : "${SHAREDLVM_ONE_SUDO:=sudo -n}"
}

# fe_args N "$@": exactly N arguments, or one clear line.
fe_args() {
    local want=$1
    shift
    if [ "$#" -ne "$want" ]; then
        die "expected $want arguments, got $#: $*"
    fi
}

# host:path split at the first ':' (OpenNebula's arg_host / arg_path), the path
# without duplicate or trailing slashes.
arg_host() { printf '%s' "${1%%:*}"; }
arg_path() {
    local p=${1#*:}
    p=$(printf '%s' "$p" | tr -s '/')
    [ "$p" = "/" ] || p=${p%/}
    printf '%s' "$p"
}

# fe_hostpath ARG: sets HOST, DPATH (checked: host:/absolute/path)
fe_hostpath() {
    case "$1" in
        *:/*) ;;
        *) die "expected host:/path, got '$1'" ;;
    esac
    HOST=$(arg_host "$1")
    DPATH=$(arg_path "$1")
    [ -n "$HOST" ] || die "no host in '$1'"
}

# fe_disk ARG: HOST, VMDIR and DISK_ID of host:<dir>/disk.N
fe_disk() {
    fe_hostpath "$1"
    case "$(basename "$DPATH")" in
        disk.[0-9]|disk.[0-9]*[0-9]) ;;
        *) die "expected host:<dir>/disk.N, got '$1'" ;;
    esac
    DISK_ID=${DPATH##*/disk.}
    [[ "$DISK_ID" =~ ^[0-9]+$ ]] || die "expected host:<dir>/disk.N, got '$1'"
    VMDIR=$(dirname "$DPATH")
}

# fe_source SOURCE: SRC_DOMAIN, SRC_IMAGE of "<domain>/<image-uuid>" (a leading
# "host:" as clone and ln get it is dropped).
fe_source() {
    local s=$1
    case "$s" in *:*) s=${s#*:} ;; esac
    SRC_DOMAIN=${s%%/*}
    SRC_IMAGE=${s#*/}
    if [ "$SRC_DOMAIN" = "$s" ] || [ -z "$SRC_DOMAIN" ] || \
            ! [[ "$SRC_IMAGE" =~ $SLONE_UUID_RE ]]; then
        die "invalid SOURCE '$1': expected <domain>/<image-uuid>"
    fi
    [[ "$SRC_DOMAIN" =~ ^[A-Za-z0-9_.+-]+$ ]] || die "invalid domain in SOURCE '$1'"
}

fe_int() {
    [[ "$2" =~ ^-?[0-9]+$ ]] || die "invalid $1 '$2': expected an integer"
}

# The script a host runs: this library, the settings it needs, then one call.
fe_script() {
    cat "$SLONE_LIB"
    printf 'SLONE_WHAT=%q\n' "$SLONE_WHAT"
    printf 'SHAREDLVM_ONE_STAGING=%q\n' "$SHAREDLVM_ONE_STAGING"
    printf 'SHAREDLVM_ONE_SUDO=%q\n' "$SHAREDLVM_ONE_SUDO"
    printf 'export LANG=C LC_ALL=C\n'
    printf '%q ' "$@"
    printf '\n'
}

# remote HOST FUNC ARGS...: run FUNC on HOST; its stdout is ours. With
# SLONE_STDIN=1 our stdin follows the script (the host function reads it).
# On failure: its ERROR line (or its last line) as ours, and exit 1.
remote() {
    local host=$1
    shift
    local err rc
    err=$(mktemp)
    # shellcheck disable=SC2086  # the setting is a command with its options
    if [ "${SLONE_STDIN:-0}" = 1 ]; then
        { fe_script "$@"; cat; } | $SHAREDLVM_ONE_REMOTE "$host" bash -s 2>"$err" \
            && rc=0 || rc=${PIPESTATUS[1]}
    else
        fe_script "$@" | $SHAREDLVM_ONE_REMOTE "$host" bash -s 2>"$err" \
            && rc=0 || rc=${PIPESTATUS[1]}
    fi
    if [ "$rc" -ne 0 ]; then
        local line
        line=$(grep -E '^ERROR: ' "$err" | tail -n 1 || true)
        if [ -z "$line" ]; then
            line=$(grep -v '^[[:space:]]*$' "$err" | tail -n 1 || true)
            line="ERROR: $SLONE_WHAT: on $host: ${line:-exit code $rc}"
        fi
        rm -f "$err"
        REMOTE_ERR=$line
        [ "${SLONE_QUIET:-0}" = 1 ] || echo "$line" >&2
        REMOTE_RC=$rc
        return "$rc"
    fi
    grep -E '^(INFO|WARN|DEBUG): ' "$err" >&2 || true
    rm -f "$err"
}

# remote_or_die HOST FUNC ARGS...
remote_or_die() {
    remote "$@" || exit 1
}

# fe_bridge "LIST": the first host of LIST (or of SHAREDLVM_ONE_BRIDGE_LIST) that
# answers; sets BRIDGE.
fe_bridge() {
    local list="${1:-}"
    [ -n "$list" ] || list=$SHAREDLVM_ONE_BRIDGE_LIST
    [ -n "$list" ] || die "no BRIDGE_LIST in the datastore and no SHAREDLVM_ONE_BRIDGE_LIST set"
    local h
    for h in $list; do
        # shellcheck disable=SC2086
        if echo true | $SHAREDLVM_ONE_REMOTE "$h" bash -s >/dev/null 2>&1; then
            BRIDGE=$h
            return 0
        fi
    done
    die "no host of the bridge list ($list) answers"
}

# fe_xml B64 XPATH...: the base64 XML's values, one a line (empty line when missing).
# XPATHs are ElementTree paths from the document's root element, e.g. IMAGE/PATH.
fe_xml() {
    python3 -c '
import base64, sys
import xml.etree.ElementTree as ET
try:
    root = ET.fromstring(base64.b64decode(sys.argv[1], validate=False))
except Exception as exc:
    sys.exit(f"ERROR: the driver action data is not base64 XML: {exc}")
for path in sys.argv[2:]:
    if path.startswith(root.tag + "/"):  # a bare <DATASTORE> document
        path = path[len(root.tag) + 1:]
    el = root.find(path)
    v = (el.text or "") if el is not None else ""
    print(" ".join(v.split()))
print("END")
' "$@" </dev/null
}

# fe_xml_into XPATH...: the values of DRV_ACTION into the array X (one per XPATH,
# empty when missing); bad XML is one ERROR line and exit 1
fe_xml_into() {
    local out
    out=$(fe_xml "$DRV_ACTION" "$@") || exit 1
    mapfile -t X <<< "$out"
    unset 'X[${#X[@]}-1]'
}

# fe_check_path PATH RESTRICTED_DIRS SAFE_DIRS: a front-end file a user may register as
# an image: not under OpenNebula's own directories, the driver user's home or the
# datastore's RESTRICTED_DIRS, unless under its SAFE_DIRS (as OpenNebula's fs driver
# does, libfs.sh): else any user could read oneadmin's credentials through a VM.
fe_check_path() {
    local real d s
    real=$(realpath -e -- "$1" 2>/dev/null) || die "cannot read $1"
    # shellcheck disable=SC2086  # space-separated lists, as OpenNebula's
    for d in /var/lib/one/ /etc/one/ ${HOME:+"$HOME/"} $2; do
        d=$(realpath -m -- "$d")
        case "${real%/}/" in
            "${d%/}/"*)
                for s in $3; do
                    s=$(realpath -m -- "$s")
                    case "${real%/}/" in "${s%/}/"*) return 0 ;; esac
                done
                die "$1 is in a restricted directory ($d): not registered (SAFE_DIRS of the datastore allow it)" ;;
        esac
    done
}

# fe_read_xml: stdin (base64 XML) into DRV_ACTION
fe_read_xml() {
    DRV_ACTION=$(cat)
    [ -n "$DRV_ACTION" ] || die "no driver action data on stdin"
}

# fe_ds_attr DSID NAME: a datastore template attribute through onedatastore, when the
# OpenNebula CLI is here (empty otherwise).
fe_ds_attr() {
    command -v onedatastore >/dev/null 2>&1 || return 0
    local xml
    xml=$(onedatastore show -x "$1" 2>/dev/null) || return 0
    python3 -c '
import sys
import xml.etree.ElementTree as ET
el = ET.fromstring(sys.argv[1]).find("TEMPLATE/" + sys.argv[2])
print((el.text or "").strip() if el is not None else "")
' "$xml" "$2" </dev/null || true
}

# fe_vm_disk_attr VMID DISK_ID NAME: a VM disk attribute through onevm (empty when
# the OpenNebula CLI is not here).
fe_vm_disk_attr() {
    command -v onevm >/dev/null 2>&1 || return 0
    local xml
    xml=$(onevm show -x "$1" 2>/dev/null) || return 0
    python3 -c '
import sys
import xml.etree.ElementTree as ET
for d in ET.fromstring(sys.argv[1]).findall("TEMPLATE/DISK"):
    if (d.findtext("DISK_ID") or "").strip() == sys.argv[2]:
        print((d.findtext(sys.argv[3]) or "").strip())
        break
' "$xml" "$2" "$3" </dev/null || true
}

# fe_domain DSID: the sharedlvm domain a datastore uses ("" = the host's only one)
fe_domain() {
    local d
    d=$(fe_ds_attr "$1" SHAREDLVM_DOMAIN)
    printf '%s' "${d:-$SHAREDLVM_ONE_DOMAIN}"
}

# fe_migrate_other ACTION ARGS...: a live-migration hook of the other TMs of the VM's
# disks (stdin XML in TEMPLATE_64), as OpenNebula's system TMs do; not when we were
# called by another TM ourselves (6th argument).
fe_migrate_other() {
    [ "$#" -ge 6 ] && return 0
    local tms tm
    tms=$(python3 -c '
import base64, sys
import xml.etree.ElementTree as ET
root = ET.fromstring(base64.b64decode(sys.argv[1]))
seen = []
for el in root.findall("TEMPLATE/DISK/TM_MAD"):
    t = (el.text or "").strip()
    if t and t not in seen:
        seen.append(t)
print(" ".join(seen))
' "$TEMPLATE_64" </dev/null 2>/dev/null || true)
    for tm in $tms; do
        [ "$tm" = "sharedlvm" ] && continue
        local script
        script="$(dirname "$0")/../$tm/$SLONE_ACTION"
        if [ -x "$script" ]; then
            info "calling $tm/$SLONE_ACTION"
            echo "$TEMPLATE_64" | "$script" "$@" sharedlvm
        fi
    done
}

# ---------------------------------------------------------------------------------
# Host side: run through "bash -s" on the host named by the action
# ---------------------------------------------------------------------------------

# sl_try ARGS: sharedlvm ARGS; SL_OUT (stdout), SL_ERR (its last stderr line, without
# "sharedlvm: "), SL_RC. sl: the same, dying on failure.
sl_try() {
    local e
    e=$(mktemp)
    SL_RC=0
    SL_OUT=$(sl_exec "$@" 2>"$e" </dev/null) || SL_RC=$?
    SL_ERR=$(grep -v '^[[:space:]]*$' "$e" | tail -n 1 | sed 's/^sharedlvm: //' || true)
    rm -f "$e"
    return "$SL_RC"
}

sl() {
    sl_try "$@" || die "sharedlvm $1 ${2:-}: ${SL_ERR:-exit code $SL_RC}"
}

# sl_exec ARGS: sharedlvm as root (its daemon's socket is root's): directly when this
# script runs as root, else through SHAREDLVM_ONE_SUDO ("sudo -n" by default)
sl_exec() {
    if [ "$(id -u)" = 0 ]; then
        sharedlvm "$@"
    else
        # shellcheck disable=SC2086  # a command with its options
        ${SHAREDLVM_ONE_SUDO:-sudo -n} sharedlvm "$@"
    fi
}

# h_dir PATH: the path on this host (under SHAREDLVM_ROOT: simulated hosts)
h_dir() {
    printf '%s%s' "${SHAREDLVM_ROOT:+${SHAREDLVM_ROOT%/}}" "$1"
}

h_has_sharedlvm() {
    command -v sharedlvm >/dev/null 2>&1 || return 1
    sl_try domain list --json || return 1
    [ -n "$(pyjson "$SL_OUT" 'd')" ]
}

# h_domain NAME: NAME, or the host's only attached domain
h_domain() {
    if [ -n "$1" ]; then
        printf '%s' "$1"
        return
    fi
    sl domain list --json
    local doms
    doms=$(pyjson "$SL_OUT" 'd')
    [ -n "$doms" ] || die "no sharedlvm domain attached on $(hostname)"
    [ "$(printf '%s\n' "$doms" | wc -l)" -eq 1 ] || \
        die "several sharedlvm domains on $(hostname): set SHAREDLVM_DOMAIN in the datastore"
    printf '%s' "$doms"
}

# h_image_json DOMAIN IMAGE: IMG_JSON; returns 1 when the image does not exist
h_image_json() {
    if sl_try image info "$2" --domain "$1" --json; then
        IMG_JSON=$SL_OUT
        return 0
    fi
    case "$SL_ERR" in
        *"not found"*) return 1 ;;
    esac
    die "sharedlvm image info $2: $SL_ERR"
}

# --- per-disk records in the VM directory -------------------------------------------
# <vmdir>/disk.N.sharedlvm: KEY=VALUE lines (DOMAIN, IMAGE, OWNED=yes|no, KIND,
# SOURCE, VMID). The UUID links and disk.N are rebuilt from the records (h_relink).

rec_get() {
    local v
    v=$(sed -n "s/^$2=//p" "$1" 2>/dev/null | tail -n 1)
    printf '%s' "$v"
}

rec_write() {
    local file=$1
    shift
    local tmp
    tmp=$(mktemp "$file.XXXXXX")
    printf '%s\n' "$@" > "$tmp"
    mv -f "$tmp" "$file"
}

# h_gen VMDIR N: how many times disk N of this VM dir was deleted (request ids of a
# disk re-attached with the same id must differ)
h_gen() {
    local g
    g=$(cat "$1/.disk.$2.gen" 2>/dev/null || true)
    printf '%s' "${g:-0}"
}

h_bump_gen() {
    local g
    g=$(h_gen "$1" "$2")
    echo $((g + 1)) > "$1/.disk.$2.gen"
}

# h_relink VMDIR: one link per volume of every disk's chain, named by its UUID, to
# the image directory of the lowest disk that has it (where sharedlvm maps it when the
# VM starts); disk.N a relative link to its leaf's UUID link; UUID links no disk uses
# removed. Links dangle until the VM runs. Nothing is done on a host without sharedlvm
# (the front-end of an undeployed VM): the next move makes them.
h_relink() {
    local dir=$1 f n root recs="" doms="" dom vols="["
    [ -d "$dir" ] || return 0
    root="${SHAREDLVM_ROOT:+${SHAREDLVM_ROOT%/}}"
    for f in "$dir"/disk.*.sharedlvm; do
        [ -f "$f" ] || continue
        n=${f##*/disk.}
        n=${n%.sharedlvm}
        [[ "$n" =~ ^[0-9]+$ ]] || continue
        dom=$(rec_get "$f" DOMAIN)
        recs="$recs$n $dom $(rec_get "$f" IMAGE)"$'\n'
        case " $doms " in *" $dom "*) ;; *) doms="$doms $dom" ;; esac
    done
    for dom in $doms; do
        if ! sl_try volume list --domain "$dom" --json; then
            h_has_sharedlvm || return 0  # an undeployed VM's front-end
            die "sharedlvm volume list --domain $dom: $SL_ERR"
        fi
        [ "$vols" = "[" ] || vols="$vols,"
        vols="$vols$SL_OUT"
    done
    vols="$vols]"
    # one line per link: "disk N LEAF" (disk.N -> LEAF) or "uuid UUID TARGET"
    local plan kind name target
    plan=$(python3 -c '
import json, sys
lists, recs, root = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
by_uuid = {v["uuid"]: v for vols in lists for v in vols}
rows = sorted((int(n), dom, img) for n, dom, img in
              (line.split() for line in recs.splitlines() if line.strip()))
links = {}
for n, dom, img in rows:
    mine = [v for v in by_uuid.values() if v["image"] == img and v["domain"] == dom]
    parents = {v["parent"] for v in mine}
    leaves = [v["uuid"] for v in mine if v["uuid"] not in parents]
    if len(leaves) != 1:
        print(f"WARN: disk {n}: image {dom}/{img} has {len(leaves)} leaves: no links",
              file=sys.stderr)
        continue
    print("disk", n, leaves[0])
    vol = leaves[0]
    while vol in by_uuid:
        links.setdefault(vol, f"{root}/run/sharedlvm/{dom}/{img}/{vol}")
        vol = by_uuid[vol]["parent"]
for vol, target in links.items():
    print("uuid", vol, target)
' "$vols" "$recs" "$root" </dev/null)
    local -A keep=()
    while read -r kind name target; do
        case "$kind" in
            disk)
                ln -sfn "$target" "$dir/.disk.$name.tmp"
                mv -fT "$dir/.disk.$name.tmp" "$dir/disk.$name"
                ;;
            uuid)
                keep[$name]=1
                if [ "$(readlink "$dir/$name" 2>/dev/null || true)" != "$target" ]; then
                    ln -sfn "$target" "$dir/.$name.tmp"
                    mv -fT "$dir/.$name.tmp" "$dir/$name"
                fi
                ;;
        esac
    done <<< "$plan"
    for f in "$dir"/*; do
        name=${f##*/}
        if [[ "$name" =~ $SLONE_UUID_RE ]] && [ -L "$f" ] && [ -z "${keep[$name]:-}" ]; then
            rm -f "$f"
        fi
    done
}

# h_rec VMDIR N: sets REC (the record's path), DOMAIN, IMAGE, OWNED; dies if none.
h_rec() {
    REC="$1/disk.$2.sharedlvm"
    [ -f "$REC" ] || die "disk $2 of $1 is not a sharedlvm disk on $(hostname) (no $REC)"
    DOMAIN=$(rec_get "$REC" DOMAIN)
    IMAGE=$(rec_get "$REC" IMAGE)
    OWNED=$(rec_get "$REC" OWNED)
    h_image_json "$DOMAIN" "$IMAGE" || die "disk $2: image $DOMAIN/$IMAGE does not exist"
    LEAF=$(pyjson "$IMG_JSON" 'd["leaf"]')
}

# h_snap_of SNAP_ID: in IMG_JSON's chain, the volume holding OpenNebula snapshot
# SNAP_ID (the parent of the volume tagged one.below=SNAP_ID): SNAP_VOL and SNAP_CHILD
# (empty when there is none)
h_snap_of() {
    local pair
    # only the image's own volumes: a template under it is another image's (whose
    # own tags must never be taken for this disk's snapshots)
    pair=$(pyjson "$IMG_JSON" "[v['parent'] + ' ' + v['uuid'] for v in d['chain'] if v['image'] == d['image'] and v['tags'].get('one.below') == '$1' and v['parent'] in [w['uuid'] for w in d['chain'] if w['image'] == d['image']]]")
    SNAP_VOL=${pair%% *}
    SNAP_CHILD=${pair#* }
    if [ -z "$pair" ]; then
        SNAP_VOL=""
        SNAP_CHILD=""
    fi
}

# h_vm_writing VOLUME: the pid and state of the VM sharedlvm runs on this host that
# writes VOLUME (VM_PID, VM_STATE; empty when none)
h_vm_writing() {
    VM_PID=""
    VM_STATE=""
    sl vm list --json
    local line
    line=$(pyjson "$SL_OUT" "[str(v['pid']) + ' ' + v['state'] for v in d if '$1' in v['writes']]" | head -n 1)
    if [ -n "$line" ]; then
        VM_PID=${line%% *}
        VM_STATE=${line#* }
    fi
}

# --- TM: clone, ln, mkimage, mkswap -------------------------------------------------

# h_clone KIND DOMAIN IMAGE VMDIR N VMID DSID MODE SIZE_MB
h_clone() {
    local kind=$1 dom=$2 src=$3 dir n=$5 vmid=$6 dsid=$7 mode=$8 size=$9
    dir=$(h_dir "$4")
    local rec="$dir/disk.$n.sharedlvm"
    if [ -f "$rec" ] && h_image_json "$(rec_get "$rec" DOMAIN)" "$(rec_get "$rec" IMAGE)"; then
        info "disk $n exists already (a retry): links only"
        h_relink "$dir"
        return 0
    fi
    h_image_json "$dom" "$src" || die "unknown SOURCE $dom/$src: no such image"
    local leaf role
    leaf=$(pyjson "$IMG_JSON" 'd["leaf"]')
    role=$(pyjson "$IMG_JSON" 'd["chain"][-1]["role"]')
    if [ "$kind" = ln ]; then
        [ "$role" != template ] || \
            die "image $dom/$src is a template (registered non-persistent): it cannot be written; make a persistent copy (oneimage clone)"
        mkdir -p "$dir"
        rec_write "$rec" "DOMAIN=$dom" "IMAGE=$src" "OWNED=no" "KIND=ln" \
            "SOURCE=$dom/$src" "VMID=$vmid"
        h_relink "$dir"
        return 0
    fi
    mkdir -p "$dir"
    local base new gen
    gen=$(h_gen "$dir" "$n")
    base="one-ds$dsid-vm$vmid-disk$n"
    [ "$gen" = 0 ] || base="$base-g$gen"
    new=$(uuid5 "$base")
    if ! h_image_json "$dom" "$new"; then
        if [ "$mode" = full ]; then
            sl volume clone "$leaf" --domain "$dom" --format qcow2 --image "$new" \
                --tag "one.vm=$vmid" --tag "one.disk=$n" --request-id "$base-clone" --json
        else
            if [ "$role" = leaf ]; then
                info "image $src becomes a template (its VM disks are linked clones)"
                sl volume template "$leaf" --domain "$dom" --request-id "one-$src-template"
            fi
            sl volume clone "$leaf" --linked --domain "$dom" --image "$new" \
                --tag "one.vm=$vmid" --tag "one.disk=$n" --request-id "$base-clone" --json
        fi
        h_image_json "$dom" "$new" || \
            die "the clone of $src answered but image $new is not there (request $base-clone reused?)"
    fi
    if [ -n "$size" ] && [ "$size" != 0 ]; then
        local cap nleaf
        nleaf=$(pyjson "$IMG_JSON" 'd["leaf"]')
        cap=$(pyjson "$IMG_JSON" 'd["chain"][-1]["capacity"]')
        if [ $((size * 1024 * 1024)) -gt "$cap" ]; then
            sl volume extend "$nleaf" --domain "$dom" --size "${size}M" \
                --request-id "$base-size-$size"
        fi
    fi
    rec_write "$rec" "DOMAIN=$dom" "IMAGE=$new" "OWNED=yes" "KIND=clone" \
        "SOURCE=$dom/$src" "VMID=$vmid"
    h_relink "$dir"
}

# h_mkimage DOMAIN VMDIR N VMID DSID SIZE_MB FORMAT: a volatile disk (swap: formatted)
h_mkimage() {
    local dom dir n=$3 vmid=$4 dsid=$5 size=$6 format=$7
    dom=$(h_domain "$1")
    dir=$(h_dir "$2")
    mkdir -p "$dir"
    local rec="$dir/disk.$n.sharedlvm"
    if [ -f "$rec" ] && h_image_json "$(rec_get "$rec" DOMAIN)" "$(rec_get "$rec" IMAGE)"; then
        info "disk $n exists already (a retry): links only"
        h_relink "$dir"
        return 0
    fi
    local base new gen vfmt=qcow2
    gen=$(h_gen "$dir" "$n")
    base="one-ds$dsid-vm$vmid-disk$n"
    [ "$gen" = 0 ] || base="$base-g$gen"
    new=$(uuid5 "$base")
    # oned gives swap disks DRIVER=raw (Datastore.cc): the guest must see the swap
    # signature, not a qcow2 header
    case "$format" in raw|swap) vfmt=raw ;; esac
    if ! h_image_json "$dom" "$new"; then
        sl volume create --domain "$dom" --size "${size}M" --format "$vfmt" --image "$new" \
            --tag "one.vm=$vmid" --tag "one.disk=$n" --request-id "$base-mkimage" --json
        h_image_json "$dom" "$new" || \
            die "the volume answered but image $new is not there (request $base-mkimage reused?)"
    fi
    if [ "$format" = swap ]; then
        local vol hdr
        vol=$(pyjson "$IMG_JSON" 'd["leaf"]')
        # mkswap on a sparse file of the same size; its header written into the volume
        # under the volume's lease (sharedlvm run: no activation without a lease)
        hdr=$(mktemp -d "$SHAREDLVM_ONE_STAGING/sharedlvm-one-swap.XXXXXX")
        truncate -s "${size}M" "$hdr/swap"
        mkswap "$hdr/swap" >/dev/null
        dd if="$hdr/swap" of="$hdr/head" bs=64k count=1 status=none
        if ! sl_try run --domain "$dom" --volume "$vol" -- qemu-io -f "$vfmt" \
                -c "write -s $hdr/head 0 65536" "{0}"; then
            rm -rf "$hdr"
            die "mkswap of volume $vol: $SL_ERR"
        fi
        rm -rf "$hdr"
    fi
    rec_write "$rec" "DOMAIN=$dom" "IMAGE=$new" "OWNED=yes" "KIND=volatile" "VMID=$vmid"
    h_relink "$dir"
}

# --- TM: delete ---------------------------------------------------------------------

# h_image_delete DOMAIN IMAGE REQUEST: gone already is fine
h_image_delete() {
    if h_image_json "$1" "$2"; then
        sl image delete "$2" --domain "$1" --request-id "$3"
    fi
}

# h_delete VMDIR N|"" [files]: one disk (N), or the whole VM directory (its disks' own
# images first). Persistent images (ln) are never deleted. "files": the images were
# deleted from another host (this one has no sharedlvm: an undeployed VM's front-end).
h_delete() {
    local dir n=$2 files=${3:-}
    dir=$(h_dir "$1")
    if [ -z "$n" ]; then
        local rec
        for rec in "$dir"/disk.*.sharedlvm; do
            [ -f "$rec" ] || continue
            n=${rec##*/disk.}
            h_delete "$1" "${n%.sharedlvm}" "$files"
        done
        rm -rf "$dir"
        return 0
    fi
    local rec="$dir/disk.$n.sharedlvm"
    if [ -f "$rec" ]; then
        local dom img
        dom=$(rec_get "$rec" DOMAIN)
        img=$(rec_get "$rec" IMAGE)
        if [ "$(rec_get "$rec" OWNED)" = yes ] && [ "$files" != files ]; then
            h_has_sharedlvm || die "NOSHAREDLVM: no sharedlvm on $(hostname) to delete image $dom/$img"
            h_image_delete "$dom" "$img" "one-delete-$img"
        fi
        rm -f "$rec" "$dir/disk.$n"
        h_bump_gen "$dir" "$n"
        h_relink "$dir"
    else
        rm -rf "${dir:?}/disk.$n"
    fi
}

# h_records VMDIR [N]: the owned images of the VM dir's records ("DOMAIN IMAGE" lines),
# for a front-end that deletes them from another host
h_records() {
    local dir rec pat="*"
    dir=$(h_dir "$1")
    [ -z "${2:-}" ] || pat=$2
    for rec in "$dir"/disk.$pat.sharedlvm; do
        [ -f "$rec" ] || continue
        [ "$(rec_get "$rec" OWNED)" = yes ] || continue
        echo "$(rec_get "$rec" DOMAIN) $(rec_get "$rec" IMAGE)"
    done
}

# --- TM: moves between hosts ---------------------------------------------------------

# h_pack VMDIR [N]: a tar stream (stdout) of what the dir holds but links (records, context ISO;
# N: only disk N's record)
h_pack() {
    local dir
    dir=$(h_dir "$1")
    if [ ! -d "$dir" ] || { [ -n "${2:-}" ] && [ ! -f "$dir/disk.$2.sharedlvm" ]; }; then
        tar -cf - -T /dev/null  # an empty archive
    elif [ -n "${2:-}" ]; then
        tar -C "$dir" -cf - "disk.$2.sharedlvm"
    else
        # a stream, never a variable: a suspended VM's checkpoint is its whole memory
        (cd "$dir" && find . -mindepth 1 -maxdepth 1 ! -type l ! -name '.*.tmp' -print0 |
            tar --null -T - -cf -)
    fi
}

# h_unpack VMDIR: the tar stream h_pack made (stdin, after this script) into the dir,
# links rebuilt
h_unpack() {
    local dir
    dir=$(h_dir "$1")
    mkdir -p "$dir"
    tar -C "$dir" -xf -
    h_relink "$dir"
}

# h_unlink_disk VMDIR N: disk N's record and links gone from this host (the volumes stay)
h_unlink_disk() {
    local dir
    dir=$(h_dir "$1")
    [ -f "$dir/disk.$2.sharedlvm" ] || return 0
    rm -f "$dir/disk.$2.sharedlvm" "$dir/disk.$2"
    h_relink "$dir"
}

# h_leave VMDIR: the VM left this host: its directory removed. Nothing is deactivated
# here: whoever activated a chain lets it go when its qemu ends (libvirt's release
# hook, sharedlvm run's exit), and a volume no lease covers here may still be opened by
# another VM of this host (a template, under libvirt).
h_leave() {
    local dir
    dir=$(h_dir "$1")
    [ -d "$dir" ] || return 0
    rm -rf "$dir"
}

# --- TM: mvds, cpds -------------------------------------------------------------------

# h_mvds VMDIR N SRC_DOMAIN SRC_IMAGE: a persistent disk (ln) is its image already:
# links only. Any other disk is copied into the SOURCE image, then its own image goes.
h_mvds() {
    local dir n=$2 sdom=$3 simg=$4
    dir=$(h_dir "$1")
    if [ ! -f "$dir/disk.$n.sharedlvm" ]; then
        info "disk $n has no record here (moved or removed already)"
        return 0
    fi
    if [ "$(rec_get "$dir/disk.$n.sharedlvm" OWNED)" != yes ]; then
        DOMAIN=$(rec_get "$dir/disk.$n.sharedlvm" DOMAIN)
        IMAGE=$(rec_get "$dir/disk.$n.sharedlvm" IMAGE)
        [ "$DOMAIN/$IMAGE" = "$sdom/$simg" ] || \
            die "disk $n is image $DOMAIN/$IMAGE, not the SOURCE $sdom/$simg"
        h_unlink_disk "$1" "$n"
        return 0
    fi
    h_has_sharedlvm || die "no sharedlvm on $(hostname) to copy disk $n into $sdom/$simg"
    h_rec "$dir" "$n"
    if ! h_image_json "$sdom" "$simg"; then
        sl volume clone "$LEAF" --domain "$DOMAIN" --format qcow2 --image "$simg" \
            --request-id "one-mvds-$simg" --json
    fi
    h_image_delete "$DOMAIN" "$IMAGE" "one-delete-$IMAGE"
    h_unlink_disk "$1" "$n"
}

# h_cpds VMDIR N SRC_DOMAIN SRC_IMAGE SNAP_ID: the disk's current state (-1) or one of
# its snapshots copied, flattened, into a new image named by SOURCE (reserved by mkfs)
h_cpds() {
    local dir n=$2 sdom=$3 simg=$4 snap=$5
    dir=$(h_dir "$1")
    h_rec "$dir" "$n"
    [ "$sdom" = "$DOMAIN" ] || die "SOURCE domain $sdom is not the disk's domain $DOMAIN"
    if h_image_json "$sdom" "$simg"; then
        info "image $simg exists already (a retry)"
        return 0
    fi
    h_image_json "$DOMAIN" "$IMAGE"
    local vol=$LEAF
    if [ "$snap" != -1 ]; then
        h_snap_of "$snap"
        [ -n "$SNAP_VOL" ] || die "disk $n has no snapshot $snap"
        vol=$SNAP_VOL
    else
        h_vm_writing "$LEAF"
        [ -z "$VM_PID" ] || \
            die "disk $n is written by the running VM (qemu $VM_PID): save a snapshot of it instead (disk-saveas with a snapshot id)"
    fi
    sl volume clone "$vol" --domain "$DOMAIN" --format qcow2 --image "$simg" \
        --request-id "one-cpds-$simg" --json
}

# --- TM: context ---------------------------------------------------------------------

# h_context VMDIR N iso|dir B64: disk.N the context ISO (a regular file), or, when the
# front-end has no ISO tool, the context files in disk.N.context/ (a tar)
h_context() {
    local dir n=$2 kind=$3
    dir=$(h_dir "$1")
    mkdir -p "$dir"
    if [ "$kind" = iso ]; then
        printf '%s' "$4" | base64 -d > "$dir/.disk.$n.tmp"
        mv -f "$dir/.disk.$n.tmp" "$dir/disk.$n"
    else
        rm -rf "$dir/disk.$n.context"
        mkdir -p "$dir/disk.$n.context"
        printf '%s' "$4" | base64 -d | tar -C "$dir/disk.$n.context" -xf -
    fi
}

# --- TM: resize -----------------------------------------------------------------------

h_resize() {
    local dir n=$2 size=$3
    dir=$(h_dir "$1")
    h_rec "$dir" "$n"
    local cap
    cap=$(pyjson "$IMG_JSON" 'd["chain"][-1]["capacity"]')
    if [ $((size * 1024 * 1024)) -le "$cap" ]; then
        info "disk $n is $((cap / 1048576)) MB already"
        return 0
    fi
    sl volume extend "$LEAF" --domain "$DOMAIN" --size "${size}M" \
        --request-id "one-$IMAGE-resize-$LEAF-$size"
}

# --- TM: snapshots ----------------------------------------------------------------------
# OpenNebula snapshot N of a disk = the volume under the volume tagged one.below=N.
# snap_create tags the new leaf; a merge keeps the tags of the volume on top, so the
# mapping follows the chain (ALLOW_ORPHANS=LINEAR: revert drops younger snapshots).

# h_snap_create VMDIR N SNAP_ID live|off
h_snap_create() {
    local dir n=$2 snap=$3 live=$4
    dir=$(h_dir "$1")
    h_rec "$dir" "$n"
    h_snap_of "$snap"
    if [ -n "$SNAP_VOL" ]; then
        info "snapshot $snap of disk $n exists already (a retry)"
        h_relink "$dir"
        return 0
    fi
    h_vm_writing "$LEAF"
    # the leaf in the request id: after a flatten or a revert oned numbers snapshots
    # from 0 again, and the same id would be answered with the first one's volume
    if [ "$live" = live ]; then
        [ -n "$VM_PID" ] || \
            die "no VM that sharedlvm knows writes disk $n (volume $LEAF) on this host: live snapshot impossible"
        [ "$VM_STATE" = running ] || die "the VM writing disk $n (qemu $VM_PID) is $VM_STATE, not running"
        sl vm snapshot "$VM_PID" --volume "$LEAF" --tag "one.below=$snap" \
            --request-id "one-$IMAGE-$LEAF-snap$snap-create"
    else
        [ -z "$VM_PID" ] || die "disk $n is written by a running VM (qemu $VM_PID): use a live snapshot"
        h_not_suspended "$dir"
        sl volume snapshot "$LEAF" --domain "$DOMAIN" --tag "one.below=$snap" \
            --request-id "one-$IMAGE-$LEAF-snap$snap-create"
    fi
    h_image_json "$DOMAIN" "$IMAGE" || die "image $DOMAIN/$IMAGE is gone"
    h_snap_of "$snap"
    [ -n "$SNAP_VOL" ] || die "snapshot $snap of disk $n was not made (volume $LEAF)"
    h_relink "$dir"
}

# h_not_suspended VMDIR: a suspended VM's saved domain names its disks' leaves; an
# offline snapshot, revert or merge would change them under it
h_not_suspended() {
    [ ! -e "$1/checkpoint" ] || die "the VM is suspended (its checkpoint is in $1): a snapshot change of its disk would not match the saved domain; resume it or power it off first"
}

# h_chain_snap_delete DOMAIN IMAGE SNAP_ID: snapshot SNAP_ID folded away: the volume on
# top of it merged into it (live through the VM's qemu when one writes the chain here)
h_chain_snap_delete() {
    local dom=$1 img=$2 snap=$3
    h_image_json "$dom" "$img" || die "image $dom/$img does not exist"
    local leaf
    leaf=$(pyjson "$IMG_JSON" 'd["leaf"]')
    h_snap_of "$snap"
    if [ -z "$SNAP_VOL" ]; then
        info "snapshot $snap is not in image $img (deleted already)"
        return 0
    fi
    h_vm_writing "$leaf"
    if [ -n "$VM_PID" ]; then
        local under
        under=$(pyjson "$IMG_JSON" 'd["chain"][-1]["parent"]')
        [ "$SNAP_CHILD" = "$leaf" ] || [ "$SNAP_CHILD" = "$under" ] || \
            die "snapshot $snap is too deep in the chain to be deleted while the VM runs (only the two youngest can): power it off first"
        sl vm merge "$VM_PID" --volume "$SNAP_CHILD" --request-id "one-$img-snap$snap-delete"
    else
        sl volume merge "$SNAP_CHILD" --domain "$dom" --request-id "one-$img-snap$snap-delete"
    fi
}

# h_chain_revert DOMAIN IMAGE SNAP_ID PENDING_FILE: every volume above snapshot
# SNAP_ID deleted (younger snapshots included: LINEAR), then a new empty leaf over it.
# PENDING_FILE remembers the target across a failure between the two.
h_chain_revert() {
    local dom=$1 img=$2 snap=$3 pending=$4 target req
    h_image_json "$dom" "$img" || die "image $dom/$img does not exist"
    h_snap_of "$snap"
    if [ -n "$SNAP_VOL" ]; then
        target=$SNAP_VOL
        req="one-$img-snap$snap-revert-$SNAP_CHILD"
        mkdir -p "$(dirname "$pending")"
        rec_write "$pending" "SNAP=$snap" "TARGET=$target" "REQ=$req"
    elif [ -f "$pending" ] && [ "$(rec_get "$pending" SNAP)" = "$snap" ]; then
        target=$(rec_get "$pending" TARGET)
        req=$(rec_get "$pending" REQ)
    else
        die "image $img has no snapshot $snap"
    fi
    local leaf
    leaf=$(pyjson "$IMG_JSON" 'd["leaf"]')
    h_vm_writing "$leaf"
    [ -z "$VM_PID" ] || die "a VM (qemu $VM_PID) writes image $img: revert needs it powered off"
    # above the target, leaf first
    local vol
    for vol in $(pyjson "$IMG_JSON" "[v['uuid'] for v in reversed(d['chain'])][:[v['uuid'] for v in reversed(d['chain'])].index('$target')]"); do
        sl volume delete "$vol" --domain "$dom" --request-id "one-revert-delete-$vol"
    done
    sl volume snapshot "$target" --domain "$dom" --tag "one.below=$snap" --request-id "$req"
    rm -f "$pending"
}

h_snap_delete() {
    local dir n=$2
    dir=$(h_dir "$1")
    h_rec "$dir" "$n"
    h_not_suspended "$dir"
    h_chain_snap_delete "$DOMAIN" "$IMAGE" "$3"
    h_relink "$dir"
}

h_snap_revert() {
    local dir n=$2
    dir=$(h_dir "$1")
    h_rec "$dir" "$n"
    h_not_suspended "$dir"
    h_chain_revert "$DOMAIN" "$IMAGE" "$3" "$dir/.disk.$n.revert"
    h_relink "$dir"
}

# --- TM: live migration -----------------------------------------------------------------

# h_vm_leaves VMDIR: "DOMAIN LEAF" of every disk recorded in the dir
h_vm_leaves() {
    local dir rec
    dir=$(h_dir "$1")
    for rec in "$dir"/disk.*.sharedlvm; do
        [ -f "$rec" ] || continue
        if h_image_json "$(rec_get "$rec" DOMAIN)" "$(rec_get "$rec" IMAGE)"; then
            pyjson "$IMG_JSON" 'd["leaf"]'
        fi
    done
}

# h_fail_dest VMDIR LEAVES: a failed migration's destination cleaned, unless the VM
# runs here (then it did migrate: nothing is touched)
h_fail_dest() {
    local dir leaf
    dir=$(h_dir "$1")
    if h_has_sharedlvm; then
        for leaf in $2; do
            h_vm_writing "$leaf"
            if [ -n "$VM_PID" ] && kill -0 "$VM_PID" 2>/dev/null; then
                [ "$VM_STATE" != running ] || \
                    die "the VM runs on this host (qemu $VM_PID writes $leaf): the migration did not fail here"
                die "a migration's destination qemu $VM_PID still waits here ($VM_STATE): end it first"
            fi
        done
    fi
    rm -rf "$dir"
}

# h_fail_source VMDIR: the source VM resumed with its leases if it released them
h_fail_source() {
    local leaf found=""
    for leaf in $(h_vm_leaves "$1"); do
        h_vm_writing "$leaf"
        [ -n "$VM_PID" ] || continue
        found=1
        case "$VM_STATE" in
            running)
                info "VM (qemu $VM_PID) runs here holding its leases: nothing to do"
                return 0
                ;;
            migrated-out)
                local rec versions
                rec="${SHAREDLVM_ROOT:+${SHAREDLVM_ROOT%/}}/run/sharedlvm/vms/$VM_PID.json"
                # 'vm list' does not show them: read from sharedlvm's record of the VM
                # (root's: through 'sharedlvm run -- cat' when not root)
                local json
                if [ "$(id -u)" = 0 ]; then
                    json=$(cat "$rec" 2>/dev/null) || json=""
                else
                    json=$(sl_exec run -- cat "$rec" 2>/dev/null </dev/null) || json=""
                fi
                versions=$(python3 -c '
import json, sys
r = json.loads(sys.argv[1])
print(json.dumps({v: n for v, n in r.get("released", [])}))
' "$json" </dev/null 2>/dev/null) || die "cannot read the released lease versions of qemu $VM_PID ($rec)"
                info "VM (qemu $VM_PID) released its leases: taking them back at $versions"
                sl vm resume "$VM_PID" --versions "$versions"
                return 0
                ;;
            *)
                die "the VM (qemu $VM_PID) is $VM_STATE here: not resumed"
                ;;
        esac
    done
    [ -n "$found" ] || warn "no VM that sharedlvm knows writes this VM's disks here: nothing resumed"
}

# --- DS: images ---------------------------------------------------------------------------

# h_cp DOMAIN IMAGE REQ SIZE_BYTES PERSISTENT MD5 SHA1: the image's bytes follow on stdin
h_cp() {
    local dom img=$2 req=$3 bytes=$4 persistent=$5 md5=$6 sha1=$7
    dom=$(h_domain "$1")
    if ! h_image_json "$dom" "$img"; then
        mkdir -p "$SHAREDLVM_ONE_STAGING"
        local tmp
        tmp=$(mktemp -d "$SHAREDLVM_ONE_STAGING/sharedlvm-one-cp.XXXXXX")
        trap 'rm -rf "$tmp"' EXIT
        cat > "$tmp/image"
        local got
        got=$(stat -c %s "$tmp/image")
        if [ -n "$bytes" ] && [ "$got" != "$bytes" ]; then
            die "received $got bytes of $bytes: transfer cut"
        fi
        [ "$got" != 0 ] || die "the image is empty"
        if [ -n "$md5" ] && [ "$(md5sum < "$tmp/image" | cut -d' ' -f1)" != "$md5" ]; then
            die "MD5 of the image does not match $md5"
        fi
        if [ -n "$sha1" ] && [ "$(sha1sum < "$tmp/image" | cut -d' ' -f1)" != "$sha1" ]; then
            die "SHA1 of the image does not match $sha1"
        fi
        sl volume upload "$tmp/image" --domain "$dom" --format qcow2 --image "$img" \
            --request-id "$req" --json
        rm -rf "$tmp"
        trap - EXIT
        h_image_json "$dom" "$img" || die "upload answered but image $img is not there"
    else
        cat > /dev/null
        info "image $img exists already (a retry)"
    fi
    if [ "$persistent" != 1 ]; then
        local leaf role
        leaf=$(pyjson "$IMG_JSON" 'd["leaf"]')
        role=$(pyjson "$IMG_JSON" 'd["chain"][-1]["role"]')
        [ "$role" = template ] || \
            sl volume template "$leaf" --domain "$dom" --request-id "one-$img-template"
    fi
    echo "$dom/$img qcow2"
}

# h_ds_clone DOMAIN SRC_IMAGE NEW_IMAGE REQ PERSISTENT: a full copy
h_ds_clone() {
    local dom=$1 src=$2 new=$3 req=$4 persistent=$5
    if ! h_image_json "$dom" "$new"; then
        h_image_json "$dom" "$src" || die "unknown SOURCE $dom/$src: no such image"
        sl volume clone "$(pyjson "$IMG_JSON" 'd["leaf"]')" --domain "$dom" --format qcow2 \
            --image "$new" --request-id "$req" --json
        h_image_json "$dom" "$new" || die "clone answered but image $new is not there"
    fi
    if [ "$persistent" != 1 ] && [ "$(pyjson "$IMG_JSON" 'd["chain"][-1]["role"]')" != template ]; then
        sl volume template "$(pyjson "$IMG_JSON" 'd["leaf"]')" --domain "$dom" \
            --request-id "one-$new-template"
    fi
    echo "$dom/$new qcow2"
}

# h_mkfs DOMAIN IMAGE REQ SIZE_MB SAVE_AS
h_mkfs() {
    local dom img=$2 req=$3 size=$4 save_as=$5
    dom=$(h_domain "$1")
    if [ "$save_as" != 1 ] && ! h_image_json "$dom" "$img"; then
        sl volume create --domain "$dom" --size "${size}M" --format qcow2 --image "$img" \
            --request-id "$req" --json
    fi
    echo "$dom/$img"
}

h_rm() {
    h_image_delete "$1" "$2" "one-rm-$2"
}

h_ds_snap_delete() {
    h_chain_snap_delete "$1" "$2" "$3"
}

h_ds_snap_revert() {
    h_chain_revert "$1" "$2" "$3" \
        "${SHAREDLVM_ROOT:+${SHAREDLVM_ROOT%/}}/var/lib/sharedlvm-one/revert/$2"
}

# h_ds_snap_flatten DOMAIN IMAGE SNAP_ID: the image becomes snapshot SNAP_ID's
# content, with no snapshot left: the volumes above it dropped, then everything
# merged down into the chain's base.
h_ds_snap_flatten() {
    local dom=$1 img=$2 snap=$3
    h_image_json "$dom" "$img" || die "image $dom/$img does not exist"
    h_snap_of "$snap"
    local target=$SNAP_VOL
    if [ -n "$target" ]; then
        local leaf vol
        leaf=$(pyjson "$IMG_JSON" 'd["leaf"]')
        h_vm_writing "$leaf"
        [ -z "$VM_PID" ] || die "a VM (qemu $VM_PID) writes image $img"
        for vol in $(pyjson "$IMG_JSON" "[v['uuid'] for v in reversed(d['chain'])][:[v['uuid'] for v in reversed(d['chain'])].index('$target')]"); do
            sl volume delete "$vol" --domain "$dom" --request-id "one-flatten-delete-$vol"
        done
    fi
    # merge down while the leaf has a parent of this image
    while true; do
        h_image_json "$dom" "$img"
        local leaf parent_img
        leaf=$(pyjson "$IMG_JSON" 'd["leaf"]')
        parent_img=$(pyjson "$IMG_JSON" "(d['chain'][-2]['image'] if len(d['chain']) > 1 else '')")
        [ "$parent_img" = "$img" ] || break
        sl volume merge "$leaf" --domain "$dom" --request-id "one-flatten-merge-$leaf"
    done
}

# h_export DOMAIN IMAGE: the image downloaded into a staging file; prints "PATH MD5 MB"
h_export() {
    local dom=$1 img=$2
    h_image_json "$dom" "$img" || die "unknown SOURCE $dom/$img: no such image"
    mkdir -p "$SHAREDLVM_ONE_STAGING"
    local file="$SHAREDLVM_ONE_STAGING/sharedlvm-one-export-$img.qcow2"
    rm -f "$file"
    sl volume download "$(pyjson "$IMG_JSON" 'd["leaf"]')" "$file" --domain "$dom" --format qcow2
    chmod a+r "$file" 2>/dev/null || true  # the marketplace reads it over ssh
    echo "$file $(md5sum < "$file" | cut -d' ' -f1) $(( ($(pyjson "$IMG_JSON" 'd["chain"][-1]["capacity"]') + 1048575) / 1048576 ))"
}

# h_monitor DOMAIN: USED_MB, TOTAL_MB, FREE_MB of the domain
h_monitor() {
    local dom
    dom=$(h_domain "$1")
    sl domain info --domain "$dom" --json
    pyjson "$SL_OUT" '"USED_MB=%d\nTOTAL_MB=%d\nFREE_MB=%d" % ((d["size"] - d["free"]) // 1048576, d["size"] // 1048576, d["free"] // 1048576)'
}
