#!/bin/sh
# A plain QEMU guest using rafsd as its vhost-user-fs back end, without Kata.
#
#   rafsd virtiofs --sock /run/rafsd/vhost-fs.sock --apisock /run/rafsd/api.sock &
#   curl --unix-socket /run/rafsd/api.sock -X POST \
#        'http://localhost/api/v1/mount?mountpoint=/rafs/img1/lowerdir' \
#        -d '{"fs_type":"rafs","source":"/path/to/bootstrap","config":"{\"device\":{\"backend\":{\"type\":\"localfs\",\"config\":{\"dir\":\"/path/to/blobs\"}}},\"mode\":\"direct\"}"}'
#   ./qemu-virtiofs.sh bzImage rootfs.img
#
# In the guest:  mount -t virtiofs rafsfs /mnt   (the image is at /mnt/rafs/img1/lowerdir)
#
# vhost-user requires the guest RAM to be shared memory (memfd, share=on)
# of the same size as -m; queue-size 1024 matches virtiofsd's default.
set -eu
KERNEL=${1:?bzImage}
DISK=${2:?root disk image}
SOCK=${RAFSD_SOCK:-/run/rafsd/vhost-fs.sock}
MEM=${MEM:-1024}
exec qemu-system-x86_64 \
	-machine q35,accel=kvm:tcg -cpu max -smp 2 -m "${MEM}M" \
	-object memory-backend-memfd,id=mem,size="${MEM}M",share=on \
	-numa node,memdev=mem \
	-chardev socket,id=rafsfs,path="$SOCK" \
	-device vhost-user-fs-pci,queue-size=1024,chardev=rafsfs,tag=rafsfs \
	-drive file="$DISK",if=virtio,format=raw \
	-kernel "$KERNEL" -append "root=/dev/vda console=ttyS0" \
	-nographic
