#!/bin/bash
# Build the bootable disk image from the assembled image (assemble.sh): the same read-only
# root every node boots, for UEFI machines and clouds.
#
#   GPT  1  kubespan-esp          EFI system partition (vfat): systemd-boot as the removable
#                                 boot path, the unified kernel image in /EFI/Linux
#        2  kubespan-root         the erofs root, as built (type: root x86-64)
#        3  kubespan-root-verity  its dm-verity hash tree (type: root verity x86-64)
#        (4 kubespan-state        made and grown to the disk's end at first boot by
#                                 kubespan-state-partition.service: /var)
#
# The unified kernel image (systemd's EFI stub with kernel, initramfs, os-release and command
# line) carries `roothash=`, so the root cannot be changed without changing what boots. The
# partition UUIDs of root and hash are the two halves of the root hash, as the Discoverable
# Partitions Specification has it.
#
# Usage: disk.sh IMAGEDIR   (reads root.erofs, vmlinuz, initrd.img, os-release there)
# Writes IMAGEDIR/{disk.raw,disk.qcow2,roothash}.
set -euo pipefail

dir=$(realpath "$1")
stub=/usr/lib/systemd/boot/efi/linuxx64.efi.stub
boot=/usr/lib/systemd/boot/efi/systemd-bootx64.efi
for tool in veritysetup sfdisk objcopy objdump mkfs.vfat mcopy mmd qemu-img; do
    command -v "$tool" >/dev/null || { echo "disk.sh: $tool is missing (make host-deps)" >&2; exit 1; }
done
for file in "$stub" "$boot" "$dir/root.erofs" "$dir/vmlinuz" "$dir/initrd.img" "$dir/os-release"; do
    [[ -r $file ]] || { echo "disk.sh: $file is missing" >&2; exit 1; }
done

work=$(mktemp -d "$dir/disk.XXXXXX")
trap 'rm -rf "$work"' EXIT
MIB=$((1024 * 1024))
mib() { echo $(((($1) + MIB - 1) / MIB)); }

# dm-verity over the root as built: the hash tree in a file of its own, the root hash out.
veritysetup format --root-hash-file="$work/roothash" "$dir/root.erofs" "$work/verity" >/dev/null
roothash=$(tr -d '[:space:]' < "$work/roothash")
[[ $roothash =~ ^[0-9a-f]{64}$ ]] || { echo "disk.sh: unexpected root hash '$roothash'" >&2; exit 1; }
as_uuid() { echo "${1:0:8}-${1:8:4}-${1:12:4}-${1:16:4}-${1:20:12}"; }
root_uuid=$(as_uuid "${roothash:0:32}")
verity_uuid=$(as_uuid "${roothash:32:32}")

# The unified kernel image: each section placed after the previous one, aligned as the stub
# asks (the layout systemd 252's stub reads; its ukify is not in Debian 12).
verity="roothash=$roothash systemd.verity_root_data=PARTUUID=$root_uuid"
verity+=" systemd.verity_root_hash=PARTUUID=$verity_uuid"
printf '%s' "console=ttyS0 root=/dev/mapper/root rootfstype=erofs ro quiet panic=-1 $verity" \
    > "$work/cmdline"
align=$((16#$(objdump -p "$stub" | awk '$1 == "SectionAlignment" { print $2 }')))
next=0
while read -r _ _ size vma _; do
    next=$((16#$size + 16#$vma))
done < <(objdump -h "$stub" | awk 'NF == 7 && $1 ~ /^[0-9]+$/')
args=()
for section in osrel:os-release cmdline:cmdline linux:vmlinuz initrd:initrd.img; do
    name=${section%%:*} file=${section#*:}
    path=$dir/$file
    [[ $file == cmdline ]] && path=$work/cmdline
    next=$((next + align - next % align))
    args+=(--add-section ".$name=$path" --change-section-vma ".$name=$(printf 0x%x "$next")")
    next=$((next + $(stat -Lc %s "$path")))
done
objcopy "${args[@]}" "$stub" "$work/kubespan.efi"

# The EFI system partition: systemd-boot finds the unified kernel image by itself.
uki_mib=$(mib "$(stat -c %s "$work/kubespan.efi")")
esp_mib=$((uki_mib + 16 < 64 ? 64 : uki_mib + 16))
mkfs.vfat -F 32 -n ESP -C "$work/esp" $((esp_mib * 1024)) >/dev/null
mmd -i "$work/esp" ::/EFI ::/EFI/BOOT ::/EFI/Linux ::/loader
mcopy -i "$work/esp" "$boot" ::/EFI/BOOT/BOOTX64.EFI
mcopy -i "$work/esp" "$work/kubespan.efi" ::/EFI/Linux/kubespan.efi
# editor no: without Secure Boot the stub takes a command line the loader passes, and one
# typed at the console could drop roothash= (and with it dm-verity).
printf 'timeout 0\neditor no\n' > "$work/loader.conf"
mcopy -i "$work/esp" "$work/loader.conf" ::/loader/loader.conf

# The disk: 1 MiB for the GPT, the partitions in MiB, 1 MiB for the backup GPT.
root_mib=$(mib "$(stat -c %s "$dir/root.erofs")")
verity_mib=$(mib "$(stat -c %s "$work/verity")")
total_mib=$((1 + esp_mib + root_mib + verity_mib + 1))
truncate -s "${total_mib}M" "$work/disk.raw"
sfdisk --quiet --no-reread --no-tell-kernel "$work/disk.raw" <<EOF
label: gpt
unit: sectors
sector-size: 512
start=$((1 * 2048)), size=$((esp_mib * 2048)), type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=kubespan-esp
start=$(((1 + esp_mib) * 2048)), size=$((root_mib * 2048)), type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, uuid=$root_uuid, name=kubespan-root, attrs=GUID:60
start=$(((1 + esp_mib + root_mib) * 2048)), size=$((verity_mib * 2048)), type=2C7357ED-EBD2-46D9-AEC1-23D437EC2BF5, uuid=$verity_uuid, name=kubespan-root-verity, attrs=GUID:60
EOF
put() { dd if="$1" of="$work/disk.raw" bs=1M seek="$2" conv=notrunc,sparse status=none; }
put "$work/esp" 1
put "$dir/root.erofs" $((1 + esp_mib))
put "$work/verity" $((1 + esp_mib + root_mib))

qemu-img convert -f raw -O qcow2 "$work/disk.raw" "$work/disk.qcow2"
printf '%s\n' "$roothash" > "$work/roothash.out"
mv "$work/disk.raw" "$dir/disk.raw"
mv "$work/disk.qcow2" "$dir/disk.qcow2"
mv "$work/roothash.out" "$dir/roothash"
echo "disk image: $dir/disk.raw ($total_mib MiB; qcow2 $(du -h "$dir/disk.qcow2" | cut -f1)), root hash $roothash"
