"""Test setup: 8 fake CPU devices (set before JAX starts) and quick hypothesis settings."""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import hypothesis  # pylint: disable=g-import-not-at-top

hypothesis.settings.register_profile('fsp', deadline=None, max_examples=25)
hypothesis.settings.load_profile('fsp')
