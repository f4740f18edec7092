# The kubespan system extension (systemd-sysext image). Rebuilt when the service, the
# extension's own files or the project metadata change.
EXTENSION := $(BUILD)/extension/kubespan.raw
EXTENSION_INPUTS := pyproject.toml $(wildcard README.md LICENSE) \
	$(shell find service extension machineconfig-schema deploy -type f \
		-not -path '*/__pycache__/*' -not -path '*.egg-info/*' 2>/dev/null)

$(EXTENSION): $(EXTENSION_INPUTS) | host-deps $(BIN)/kubespan
	PYTHON=$(BIN)/python extension/build.sh $@

extension: $(EXTENSION)
