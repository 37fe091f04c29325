#!/bin/busybox sh
# /init of the test guest (scripts/guest-image.sh). Fills RAM with a realistic mix, then runs
# a dirtying workload and prints a heartbeat on the serial console:
#   dwcp-guest ready ...      filling done (the host waits for this line)
#   dwcp-guest tick N         every second
#   dwcp-guest check ok|BAD   every 5 s: a 4 MiB file written at start still has its digest
# Kernel command-line knobs: dwcp.dirty=PAGES_PER_SECOND (default 256, 0 for none),
# dwcp.fill=0 to skip filling. Of RAM (the kernel's own pages counted), about 35 % stays zero,
# 30 % is code, 15 % text, 10 % duplicates of the code, 10 % random: the reference guest of
# the migration issue. `dwcp bench guest` boots this guest and counts what its RAM holds.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null

param() { sed -n "s/.*dwcp\.$1=\([0-9]*\).*/\1/p" /proc/cmdline; }
dirty=$(param dirty)
dirty=${dirty:-256}
fill=$(param fill)
fill=${fill:-1}

mem_kib=$(awk '/MemTotal/ {print $2}' /proc/meminfo)
# All of RAM, the kernel's reserved part included ("Memory: 983744K/1048056K available").
ram_kib=$(dmesg 2>/dev/null | sed -n 's/.*Memory: [0-9]*K\/\([0-9]*\)K available.*/\1/p' | head -1)
ram_kib=${ram_kib:-$mem_kib}
mount -t tmpfs -o size=90% tmpfs /mem
kib_of() { du -sk "$@" 2>/dev/null | awk '{s += $1} END {print s + 0}'; }
# What is in use before filling: the kernel, its data and this initramfs (payload included).
base_kib=$((ram_kib - $(awk '/MemFree/ {print $2}' /proc/meminfo)))
# What may still be filled: MemAvailable less a reserve for the workload and the kernel.
room() { awk '/MemAvailable/ {r = $2 - 32768; print (r > 0 ? r : 0)}' /proc/meminfo; }

# The disk (scripts/guest-image.sh: disk.img), when QEMU attaches it: virtio-blk.
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk; do
    [ -f "/lib/modules/$m.ko" ] && insmod "/lib/modules/$m.ko" 2>/dev/null
done
i=0
# Wait for it only if a virtio device showed up (a guest started without the disk goes on).
while [ ! -b /dev/vda ] && [ -n "$(ls /sys/bus/virtio/devices 2>/dev/null)" ] && [ "$i" -lt 30 ]; do
    sleep 0.1
    i=$((i + 1))
done
disk_index=""
disk_copies=0
[ -b /dev/vda ] && disk_index=$(dd if=/dev/vda bs=4096 count=1 2>/dev/null | grep -a -E '^(code|text) [0-9]+ [0-9]+ [0-9]+$')

# Copies of a payload until `budget` KiB are used (the last one cut short; at least `least`
# KiB when there is room): first those on the disk, read the way a page cache holds a file
# (each disk page becomes one page in RAM; O_DIRECT, so that the block device's own cache
# keeps no second copy; a disk that cannot do that is not used), then made here: each copy
# shifted by a few hundred bytes so that no page repeats another (same kind of content,
# different pages).
copies() { # name src budget_kib least_kib
    i=1
    used=0
    want=$3
    [ "$want" -lt "$4" ] && want=$4
    # shellcheck disable=SC2086
    set -- "$1" "$2" "$want" $(echo "$disk_index" | grep "^$1 ")
    while [ -n "$5" ] && [ "$used" -lt "$3" ] && [ "$i" -le "$7" ] \
        && [ "$(room)" -gt $(($6 * 4)) ]; do
        at=$((($5 + (i - 1) * $6) * 4096))
        n=$(($6 * 4))
        [ "$n" -gt $(($3 - used)) ] && n=$(($3 - used))
        if dd if=/dev/vda of="/mem/$1.$i" bs=1M iflag=direct,skip_bytes,count_bytes \
            skip=$at count=$((n * 1024)) 2>/dev/null; then
            disk_copies=$((disk_copies + 1))
        else
            rm -f "/mem/$1.$i"
            break
        fi
        used=$(kib_of /mem/$1.*)
        i=$((i + 1))
    done
    # The shift (i * 331 mod 4093 bytes) differs for every copy up to 4093 of them.
    while [ "$used" -lt "$3" ] && [ "$i" -lt 200 ] && [ "$(room)" -gt "$(kib_of "$2")" ]; do
        { yes "dwcp-guest copy $i" | head -c $((i * 331 % 4093)); cat "$2"/*; } \
            | head -c $((($3 - used) * 1024)) >"/mem/$1.$i"
        used=$(kib_of /mem/$1.*)
        i=$((i + 1))
    done
}

dd if=/dev/urandom of=/mem/check bs=4096 count=1024 2>/dev/null
check=$(md5sum /mem/check | cut -d' ' -f1)
code_kib=0
text_kib=0
dup_kib=0
random_kib=$((ram_kib * 10 / 100 - 4096))
if [ "$fill" = 1 ]; then
    payload_lib=$(kib_of /payload/lib)
    payload_text=$(kib_of /payload/text)
    # Fitted with `dwcp bench guest` on a 1 GiB guest (kernel linux-image-6.1.0-48): the
    # kernel leaves about 38 MiB of free pages that repeat others (freed copies of its image
    # and of this initramfs), so the duplicates made here are that much fewer. Code takes
    # the rest of the 65 % that is not zero, the kernel's own pages counted as code; the
    # second constant makes up for what that sum does not see (zero pages within what the
    # kernel uses and within the payload's files, and the repeats above).
    kernel_dup=38912
    base_zero=14336
    text_kib=$((ram_kib * 15 / 100 - payload_text))
    dup_kib=$((ram_kib * 10 / 100 - kernel_dup))
    code_kib=$((ram_kib * 65 / 100 - (base_kib - base_zero) - text_kib - dup_kib - random_kib - 4096))
    # One copy of the code at least, so that a small guest still reads its disk.
    copies code /payload/lib "$code_kib" "$payload_lib"
    copies text /payload/text "$text_kib" 0
    # Duplicates: the payload's files again, whole pages the same as theirs, until the budget.
    sizes=$(for f in /payload/lib/*; do echo "$(kib_of "$f") $f"; done)
    i=1
    used=0
    while [ "$used" -lt "$dup_kib" ] && [ "$i" -lt 100 ]; do
        added=0
        while read -r k f; do
            [ $((used + k)) -le "$dup_kib" ] && [ "$(room)" -gt $((k + 1024)) ] || continue
            mkdir -p "/mem/dup.$i"
            cp "$f" "/mem/dup.$i/"
            used=$((used + k))
            added=1
        done <<EOF
$sizes
EOF
        [ "$added" = 1 ] || break
        i=$((i + 1))
    done
fi
random_pages=$((random_kib / 4))
[ "$random_pages" -gt $(($(room) / 4)) ] && random_pages=$(($(room) / 4))
[ "$random_pages" -lt 256 ] && random_pages=256
dd if=/dev/urandom of=/mem/random bs=4096 count=$random_pages 2>/dev/null
echo "dwcp-guest ready mem_kib=$mem_kib ram_kib=$ram_kib base_kib=$base_kib filled_kib=$(kib_of /mem /payload)" \
    "code_kib=$(kib_of /mem/code.*) text_kib=$(kib_of /mem/text.*) dup_kib=$(kib_of /mem/dup.*)" \
    "random_kib=$(kib_of /mem/random /mem/check) dirty_pages_per_s=$dirty disk_copies=$disk_copies"

(
    n=0
    while true; do
        n=$((n + 1))
        echo "dwcp-guest tick $n"
        if [ $((n % 5)) = 0 ]; then
            if [ "$(md5sum /mem/check | cut -d' ' -f1)" = "$check" ]; then
                echo "dwcp-guest check ok"
            else
                echo "dwcp-guest check BAD"
            fi
        fi
        sleep 1
    done
) &

# The workload: rewrite random pages of /mem/random, `dirty` pages a second in tenths; with
# dwcp.hot=PAGES only pages among its first PAGES (a working set it keeps rewriting).
per=$((dirty / 10))
span=$random_pages
hot=$(param hot)
[ -n "$hot" ] && [ "$hot" -gt 0 ] && [ "$hot" -lt "$span" ] && span=$hot
[ "$per" -ge "$span" ] && per=$((span - 1))
while true; do
    if [ "$per" -gt 0 ]; then
        at=$(((RANDOM * 32768 + RANDOM) % (span - per)))
        dd if=/dev/urandom of=/mem/random bs=4096 count=$per seek=$at conv=notrunc 2>/dev/null
    fi
    sleep 0.1
done
