#!/bin/bash
# Install the sharedlvm OpenNebula drivers on the front-end:
#   remotes/tm/sharedlvm/*, remotes/datastore/sharedlvm/* and
#   remotes/etc/sharedlvm/sharedlvm.conf (kept if it exists).
# oned.conf and vmm_execrc are only printed about, unless asked:
#
#   install.sh [--remotes DIR] [--owner USER:GROUP]
#              [--edit-oned-conf [FILE]] [--edit-vmm-execrc [FILE]]
#              [--edit-kvm-deploy]
#
# --edit-kvm-deploy: OpenNebula's kvm deploy script (remotes/vmm/kvm/deploy) passes
# the deployment file through 'sharedlvm libvirt add-leases' before libvirt starts
# the VM: the <lease> libvirt holds in qemu for each disk on a sharedlvm image.
#
# Then: "onehost sync --force" (the hosts get the remotes), restart oned if its
# configuration changed. The hosts need sharedlvm installed, its daemon running and
# the domain attached; the remote user root, or sudo on sharedlvm (sharedlvm.conf).
set -euo pipefail

SRC=$(cd "$(dirname "$0")" && pwd)
REMOTES=/var/lib/one/remotes
OWNER=""
ONED_CONF=""
EXECRC=""
KVM_DEPLOY=no
id oneadmin >/dev/null 2>&1 && OWNER=oneadmin:oneadmin

die() { echo "ERROR: install.sh: $*" >&2; exit 1; }

while [ "$#" -gt 0 ]; do
    case "$1" in
        --remotes) REMOTES=${2:?--remotes DIR}; shift 2 ;;
        --owner) OWNER=${2:?--owner USER:GROUP}; shift 2 ;;
        --edit-oned-conf)
            ONED_CONF=/etc/one/oned.conf
            if [ "$#" -gt 1 ] && [ "${2#--}" = "$2" ]; then ONED_CONF=$2; shift; fi
            shift ;;
        --edit-vmm-execrc)
            EXECRC=/etc/one/vmm_exec/vmm_execrc
            if [ "$#" -gt 1 ] && [ "${2#--}" = "$2" ]; then EXECRC=$2; shift; fi
            shift ;;
        --edit-kvm-deploy) KVM_DEPLOY=yes; shift ;;
        -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done

[ -d "$REMOTES" ] || die "no $REMOTES: is OpenNebula installed here? (--remotes DIR)"
[ "$KVM_DEPLOY" = no ] || [ -f "$REMOTES/vmm/kvm/deploy" ] || \
    die "no $REMOTES/vmm/kvm/deploy (--edit-kvm-deploy): nothing installed"

for kind in tm datastore; do
    dst="$REMOTES/$kind/sharedlvm"
    mkdir -p "$dst"
    install -m 0755 "$SRC/$kind"/* "$dst/"
    install -m 0644 "$SRC/sharedlvm-one.sh" "$dst/sharedlvm-one.sh"
    [ -z "$OWNER" ] || chown -R "$OWNER" "$dst"
    echo "installed $dst"
done
mkdir -p "$REMOTES/etc/sharedlvm"
if [ -e "$REMOTES/etc/sharedlvm/sharedlvm.conf" ]; then
    echo "kept $REMOTES/etc/sharedlvm/sharedlvm.conf (the new sample: $SRC/sharedlvm.conf)"
else
    install -m 0644 "$SRC/sharedlvm.conf" "$REMOTES/etc/sharedlvm/sharedlvm.conf"
    echo "installed $REMOTES/etc/sharedlvm/sharedlvm.conf"
fi
[ -z "$OWNER" ] || chown -R "$OWNER" "$REMOTES/etc/sharedlvm"

if [ -n "$ONED_CONF" ]; then
    [ -f "$ONED_CONF" ] || die "no $ONED_CONF"
    backup="$ONED_CONF.bak-$(date +%Y%m%d%H%M%S)"
    cp -p "$ONED_CONF" "$backup"
    python3 - "$ONED_CONF" "$SRC/oned.conf.snippet" <<'PY'
import re
import sys

path, snippet = sys.argv[1], sys.argv[2]
text = open(path).read()

def add(block_name: str, flag: str, text: str) -> str:
    """'sharedlvm' added to the FLAG list of BLOCK's ARGUMENTS, if missing."""
    block = re.search(block_name + r'\s*=\s*\[(.*?)\]', text, re.S)
    if not block:
        sys.exit(f"ERROR: install.sh: no {block_name} block in {path}: edit it by hand")
    args = re.search(r'ARGUMENTS\s*=\s*"([^"]*)"', block.group(1))
    if not args:
        sys.exit(f"ERROR: install.sh: no ARGUMENTS in {block_name}: edit it by hand")
    new_args = re.sub(r'(' + flag + r'\s+)(\S+)',
                      lambda m: m.group(1) + (m.group(2) if "sharedlvm" in
                                              m.group(2).split(",")
                                              else m.group(2) + ",sharedlvm"),
                      args.group(1), count=1)
    start = block.start(1) + args.start(1)
    return text[:start] + new_args + text[start + len(args.group(1)):]

text = add("TM_MAD", "-d", text)
text = add("DATASTORE_MAD", "-d", text)
text = add("DATASTORE_MAD", "-s", text)
if not re.search(r'NAME\s*=\s*"sharedlvm"', text):
    text += "\n" + open(snippet).read()
open(path, "w").write(text)
PY
    echo "edited $ONED_CONF (backup: $backup): restart oned"
else
    cat <<EOT

oned.conf was not changed (--edit-oned-conf does it). By hand:
  - add "sharedlvm" to the -d list of TM_MAD's ARGUMENTS,
  - add "sharedlvm" to the -d and the -s lists of DATASTORE_MAD's ARGUMENTS,
  - append $SRC/oned.conf.snippet (TM_MAD_CONF and DS_MAD_CONF),
  - restart oned.
EOT
fi

if [ -n "$EXECRC" ]; then
    [ -f "$EXECRC" ] || die "no $EXECRC"
    if grep -q 'kvm-sharedlvm' "$EXECRC"; then
        echo "$EXECRC has kvm-sharedlvm already"
    elif grep -q '^LIVE_DISK_SNAPSHOTS=' "$EXECRC"; then
        cp -p "$EXECRC" "$EXECRC.bak-$(date +%Y%m%d%H%M%S)"
        sed -i 's/^\(LIVE_DISK_SNAPSHOTS="[^"]*\)"/\1 kvm-sharedlvm"/' "$EXECRC"
        echo "edited $EXECRC: live disk snapshots enabled for kvm-sharedlvm"
    else
        die "no LIVE_DISK_SNAPSHOTS line in $EXECRC: add kvm-sharedlvm by hand"
    fi
else
    cat <<EOT

Live disk snapshots (snap_create_live): add kvm-sharedlvm to LIVE_DISK_SNAPSHOTS in
/etc/one/vmm_exec/vmm_execrc (--edit-vmm-execrc does it).
EOT
fi
DEPLOY="$REMOTES/vmm/kvm/deploy"
MARK="# sharedlvm (install.sh --edit-kvm-deploy)"
# shellcheck disable=SC2016  # the deploy script's own line, not expanded here
CREATE='DATA=`virsh --connect $LIBVIRT_URI create $DEP_FILE`'
if [ "$KVM_DEPLOY" = yes ]; then
    [ -f "$DEPLOY" ] || die "no $DEPLOY"
    if grep -qF "$MARK" "$DEPLOY"; then
        echo "$DEPLOY adds sharedlvm's leases already"
    elif grep -qxF "$CREATE" "$DEPLOY"; then
        cp -p "$DEPLOY" "$DEPLOY.bak-$(date +%Y%m%d%H%M%S)"
        python3 - "$DEPLOY" "$MARK" "$CREATE" <<'PY'
import sys

path, mark, create = sys.argv[1], sys.argv[2], sys.argv[3]
lines = open(path).read().split("\n")
# right before libvirt is given the file: after OpenNebula's own edits of it (its sed
# expects its own quoting, which add-leases does not keep)
at = lines.index(create)
lines[at:at] = [
    mark + ": the <lease> of each disk on a sharedlvm image,",
    "# held by libvirt in qemu ('sharedlvm libvirt add-leases'); hosts without sharedlvm skip it",
    "if command -v sharedlvm >/dev/null 2>&1; then",
    '    if [ "$(id -u)" = 0 ]; then SL_ADD=(sharedlvm); else SL_ADD=(sudo -n sharedlvm); fi',
    '    "${SL_ADD[@]}" libvirt add-leases --in-place "$DEP_FILE" || exit 1',
    "fi",
]
open(path, "w").write("\n".join(lines))
PY
        echo "edited $DEPLOY: deployment files get sharedlvm's leases"
    else
        die "no 'DATA=\`virsh ... create \$DEP_FILE\`' line in $DEPLOY: add 'sharedlvm libvirt add-leases --in-place \$DEP_FILE' before it by hand"
    fi
else
    cat <<EOT

VMs run by libvirt need the lease of each sharedlvm disk in their domain XML: OpenNebula's
kvm deploy script ($DEPLOY) must run 'sharedlvm libvirt add-leases --in-place \$DEP_FILE'
(as root) right before 'virsh create' (--edit-kvm-deploy does it). On every host:
'sharedlvm libvirt install' (the sanlock lock driver and sharedlvm's qemu hook).
EOT
fi
echo
echo "Then: onehost sync --force"
