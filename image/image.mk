# The bootable OS image. Two stages:
#   base.tar   mmdebstrap of Debian bookworm (slow, about a minute; rebuilt only when
#              image/base/ changes)
#   root.erofs the read-only root assembled from base.tar + image/rootfs + the extension
#              (fast), exported with vmlinuz and initrd.img for direct kernel boot.
IMAGE_DIR := $(BUILD)/image
BASE_TAR := $(IMAGE_DIR)/base.tar
IMAGE_FILES := $(IMAGE_DIR)/root.erofs $(IMAGE_DIR)/vmlinuz $(IMAGE_DIR)/initrd.img $(IMAGE_DIR)/os-release

$(BASE_TAR): $(shell find image/base -type f) | host-deps
	image/base/build-base.sh $@

$(IMAGE_FILES) &: $(BASE_TAR) $(EXTENSION) image/assemble.sh extension/extension-release \
		$(shell find image/rootfs -type f -o -type l)
	image/assemble.sh $(BASE_TAR) $(EXTENSION) $(IMAGE_DIR)

image: $(IMAGE_FILES)

# The bootable disk image (GPT, EFI system partition with systemd-boot and a unified kernel
# image, dm-verity over the erofs root): raw for dd or a cloud import, qcow2 for QEMU.
DISK_IMAGE := $(IMAGE_DIR)/disk.raw $(IMAGE_DIR)/disk.qcow2 $(IMAGE_DIR)/roothash

$(DISK_IMAGE) &: $(IMAGE_FILES) image/disk.sh | host-deps
	image/disk.sh $(IMAGE_DIR)

disk-image: $(DISK_IMAGE)
