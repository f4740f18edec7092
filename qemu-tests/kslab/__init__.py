"""kslab: boot kubespan images in QEMU on isolated virtual networks.

Everything lives in a network namespace made for the test: one Linux bridge per network
segment, one tap per VM NIC, QEMU (software emulation) and any host-side helper processes
started inside that namespace. Nothing touches the host's own network.

    with Lab(workdir, find_image(repo)) as lab:
        lan = lab.add_segment("lan")
        vm = lab.boot(VmSpec("node1", nics=(NicSpec("lan", (lan.address(11),)),)))
        print(vm.check(["uname", "-r"]))
"""

from kslab.artefacts import ArtefactMissingError, Image, find_image, find_plain_image
from kslab.capture import Capture
from kslab.errors import LabError
from kslab.lab import Lab
from kslab.netns import Namespace, Segment
from kslab.platform import cluster_identity, static_network
from kslab.proc import HostProcess
from kslab.qga import ExecResult, GuestAgent, GuestAgentError
from kslab.router import NatKind, Router, RouterSpec, drop_rule, nat_ruleset
from kslab.vm import NicSpec, Vm, VmSpec
from kslab.wait import wait_until

__all__ = [
    "ArtefactMissingError",
    "Capture",
    "ExecResult",
    "GuestAgent",
    "GuestAgentError",
    "HostProcess",
    "Image",
    "Lab",
    "LabError",
    "Namespace",
    "NatKind",
    "NicSpec",
    "Router",
    "RouterSpec",
    "Segment",
    "Vm",
    "VmSpec",
    "cluster_identity",
    "drop_rule",
    "find_image",
    "find_plain_image",
    "nat_ruleset",
    "static_network",
    "wait_until",
]
