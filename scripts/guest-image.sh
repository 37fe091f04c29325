#!/usr/bin/env bash
# Builds the test guest for the QEMU migration backend from Debian packages:
#   OUT/vmlinuz           the Debian kernel (linux-image-amd64, the package's current version)
#   OUT/initramfs.cpio.gz busybox-static plus /init (scripts/guest-init.sh), the kernel's
#                         virtio-blk modules and a payload of this machine's shared libraries
#                         and text files, which /init copies into RAM to give the guest a
#                         realistic memory mix.
#   OUT/disk.img          the guest's disk: copies of that payload, which /init reads into RAM
#                         the way a VM's page cache holds its disk's files (QEMU attaches it
#                         read-only; a destination holding it can seed its baseline cache).
# Usage: scripts/guest-image.sh [OUT]   (default target/guest; no root needed, only apt-get)
# The packages are downloaded (`apt-get download`), not installed. Re-running with an existing
# OUT whose files are newer than this script and guest-init.sh does nothing.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/../target/guest}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"

if [ -s "$out/vmlinuz" ] && [ -s "$out/initramfs.cpio.gz" ] \
    && { [ -s "$out/disk.img" ] || [ -e "$out/nodisk" ]; } \
    && [ "$out/initramfs.cpio.gz" -nt "$here/guest-init.sh" ] \
    && [ "$out/initramfs.cpio.gz" -nt "$here/guest-image.sh" ]; then
    echo "guest image up to date in $out"
    exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
chmod 0777 "$work" # apt-get download runs as _apt where it can

# The kernel: linux-image-amd64 is a metapackage; fetch the versioned image it depends on.
kpkg="$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')"
if [ -z "$kpkg" ]; then
    echo "guest-image: cannot resolve linux-image-amd64 (run apt-get update?)" >&2
    exit 1
fi
apt-get download -q "$kpkg" busybox-static >/dev/null 2>&1 || apt-get download "$kpkg" busybox-static
dpkg-deb -x busybox-static_*.deb bb
dpkg-deb --fsys-tarfile "${kpkg}"_*.deb | tar -x --wildcards './boot/vmlinuz-*'
cp boot/vmlinuz-* "$out/vmlinuz"
# The modules for the disk (virtio-blk), wherever this package keeps them (lib/ or usr/lib/,
# compressed or not).
dpkg-deb --fsys-tarfile "${kpkg}"_*.deb | tar -x --wildcards \
    '*/kernel/drivers/virtio/*' '*/kernel/drivers/block/virtio_blk.ko*' 2>/dev/null || true

root="$work/root"
mkdir -p "$root"/{bin,dev,proc,sys,mem,payload/lib,payload/text,lib/modules}
# What /init loads (in this order) to see the disk. Without them the guest has no disk and
# makes all its copies itself (the seeded benchmark case then finds nothing to seed from).
with_disk=1
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk; do
    f="$(find . -path ./root -prune -o -name "$m.ko*" -print | head -1)"
    case "$f" in
    *.ko) cp "$f" "$root/lib/modules/" ;;
    *.ko.xz) "$work/bb/bin/busybox" unxz -c "$f" >"$root/lib/modules/$m.ko" || with_disk=0 ;;
    *.ko.gz) "$work/bb/bin/busybox" gunzip -c "$f" >"$root/lib/modules/$m.ko" || with_disk=0 ;;
    *.ko.zst) { command -v zstd >/dev/null && zstd -qdc "$f" >"$root/lib/modules/$m.ko"; } || with_disk=0 ;;
    *) with_disk=0 ;;
    esac
    if [ "$with_disk" = 0 ]; then
        echo "guest-image: module $m not found in $kpkg (or cannot be unpacked): the guest gets no disk" >&2
        break
    fi
done
cp bb/bin/busybox "$root/bin/busybox"
cp "$here/guest-init.sh" "$root/init"
chmod 0755 "$root/init" "$root/bin/busybox"

# Payload: real ELF code and real text from this machine, about 48 MiB and 12 MiB.
budget_copy() { # budget_kib dest files...
    local budget=$1 dest=$2 used=0 f sz
    shift 2
    for f in "$@"; do
        [ -f "$f" ] && [ ! -L "$f" ] || continue
        sz=$(($(stat -c %s "$f") / 1024))
        [ $((used + sz)) -le "$budget" ] || continue
        cp "$f" "$dest/$(echo "$f" | tr / _)"
        used=$((used + sz))
    done
}
# shellcheck disable=SC2046
budget_copy $((48 * 1024)) "$root/payload/lib" $(ls -S /usr/lib/x86_64-linux-gnu/*.so* 2>/dev/null | head -400)
# shellcheck disable=SC2046
budget_copy $((12 * 1024)) "$root/payload/text" $(find /usr/share/perl /usr/share/perl5 /usr/share/doc /usr/share/common-licenses \
    -type f \( -name '*.pm' -o -name '*.pl' -o -name 'copyright' -o -name '*.txt' -o -name 'GPL*' \) 2>/dev/null | sort | head -4000)

# The disk: page 0 lists the copies ("KIND FIRST_PAGE PAGES COPIES" per line); each copy
# starts on a 4 KiB page, is shifted by a few hundred bytes (so that no page repeats another,
# as in guest-init.sh) and padded to PAGES pages. 6 and 12 copies: with payloads of about
# 48 and 12 MiB, the 30 % and 15 % of a 1 GiB guest; a guest that wants more (a larger guest,
# or a host with smaller payloads) makes the rest itself.
disk="$out/disk.img.tmp"
rm -f "$disk"
header=""
page=1
add_copies() { # kind dir copies
    local kind=$1 dir=$2 n=$3 i size stride
    size=$(cat "$dir"/* | wc -c)
    stride=$(((size + n * 331 + 4095) / 4096))
    header="$header$kind $page $stride $n
"
    for i in $(seq 1 "$n"); do
        { head -c $((i * 331)) "$here/guest-init.sh"; cat "$dir"/*; } >"$work/copy"
        truncate -s $((stride * 4096)) "$work/copy"
        dd if="$work/copy" of="$disk" bs=4096 seek="$page" conv=notrunc status=none
        page=$((page + stride))
    done
}
# `nodisk` says the last build could not make one (delete it to try again).
rm -f "$out/disk.img" "$out/nodisk"
[ "$with_disk" = 1 ] || echo "the kernel's virtio-blk modules were not usable" >"$out/nodisk"
if [ "$with_disk" = 1 ]; then
    add_copies code "$root/payload/lib" 6
    add_copies text "$root/payload/text" 12
    printf '%s' "$header" | dd of="$disk" conv=notrunc status=none
    mv "$disk" "$out/disk.img"
fi

(cd "$root" && find . | "$work/bb/bin/busybox" cpio -o -H newc 2>/dev/null) | gzip -1 > "$out/initramfs.cpio.gz.tmp"
mv "$out/initramfs.cpio.gz.tmp" "$out/initramfs.cpio.gz"
echo "guest image in $out: $(du -h "$out/vmlinuz" | cut -f1) kernel ($kpkg), $(du -h "$out/initramfs.cpio.gz" | cut -f1) initramfs, $(du -h "$out/disk.img" 2>/dev/null | cut -f1 || echo no) disk"
