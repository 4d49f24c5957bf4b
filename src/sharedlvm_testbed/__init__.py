"""The sharedlvm test bed: simulated hosts, the demos and test tools. Not the product.

Everything here exists to run sharedlvm on one machine as if on many hosts: the
``loop`` backend (:mod:`.sim`, :mod:`.simhost`: one ``SHAREDLVM_ROOT`` with its own
sanlock and sharedlvm daemons per host, file-backed LUNs on loop devices), the ``vm``
backend (:mod:`.vmbed`: each host a qemu guest with a real kernel, device-mapper and
a watchdog), the ``sharedlvm-sim`` command (:mod:`.cli`), ``make demo`` and
``make demo-vm`` (:mod:`.demo`, :mod:`.demo_vm`) and the double-writer detector
:mod:`.devcount`.

The test bed may import the product (``sharedlvm.*``, absolute imports); the product
never imports the test bed (``tests/unit/test_testbed_boundary.py`` checks both the
sources and a fresh interpreter), so a production host needs none of this.
"""
