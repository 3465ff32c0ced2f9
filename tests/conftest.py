"""Test setup: 4 fake CPU devices (set before JAX starts), a compilation cache shared by the
workers and the main.py subprocesses (in memory, each test frees what it compiled),
experiments/ on the path, and quick hypothesis settings."""

import os
import sys
import tempfile

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=4').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), 'fsp_jax_tests_xla_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')

# The experiment configs and their helpers (experiments/configs/common.py), as main.py sees them.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                'experiments'))

import hypothesis  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top

hypothesis.settings.register_profile('fsp', deadline=None, max_examples=25)
hypothesis.settings.load_profile('fsp')


def pytest_configure(config):
  """pytest-xdist hands tests out one at a time (not in chunks that put every slow test on the
  same worker)."""
  if getattr(config.option, 'maxschedchunk', 1) is None:
    config.option.maxschedchunk = 1


def pytest_collection_modifyitems(items):
  """Tests marked slow first (in their order): handed out one at a time, they spread over the
  workers, and the short ones fill whichever worker frees up, so that the run does not end
  waiting on one long test."""
  items.sort(key=lambda item: item.get_closest_marker('slow') is None)


@pytest.fixture(autouse=True)
def _no_compiled_programs_from_earlier_tests():
  """Frees what a test compiled (about 0.7 GB per experiment config, held by JAX's caches and
  the step factories' caches in steps.py), so that a worker's memory stays that of one test; the
  disk cache above keeps compiling them again cheap."""
  yield
  import jax  # pylint: disable=g-import-not-at-top
  from fsp_jax import steps  # pylint: disable=g-import-not-at-top
  jax.clear_caches()
  for factory in vars(steps).values():
    if hasattr(factory, 'cache_clear'):
      factory.cache_clear()
