# The kubespan Debian package (deb/build.sh): build/deb/kubespan_VERSION_amd64.deb, the only
# .deb there. Rebuilt from the extension's inputs (the same staged /usr tree) and deb/'s files;
# VERSION carries the build stamp, so the stamp file below is what make tracks.
DEB_DIR := $(BUILD)/deb
DEB_STAMP := $(DEB_DIR)/.built
DEB_INPUTS := $(EXTENSION_INPUTS) $(wildcard deb/*)

# A package deleted by hand is built again even while the stamp is there.
$(DEB_STAMP): $(DEB_INPUTS) $(if $(wildcard $(DEB_DIR)/kubespan_*_amd64.deb),,deb-missing) \
		| host-deps $(BIN)/kubespan
	PYTHON=$(BIN)/python deb/build.sh $(DEB_DIR)
	touch $@

deb: $(DEB_STAMP)

.PHONY: deb-missing
deb-missing:
