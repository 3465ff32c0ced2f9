"""Torchvision -> Flax weight import: logits parity with a PyTorch ResNet, and bad inputs."""

import os

import chex
import numpy as np
import pytest

torch = pytest.importorskip(
    'torch', reason='PyTorch is not installed: the test extra installs its CPU build on Python '
    '3.11 only (elsewhere pip would fetch a multi-GB CUDA build); pip install torch to run these')
nn = torch.nn

from fsp_jax import checkpoints, convert, models


class TorchBasicBlock(nn.Module):
  """torchvision.models.resnet.BasicBlock, with its parameter names."""

  def __init__(self, inplanes, planes, stride=1):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU(inplace=True)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = None
    if stride != 1 or inplanes != planes:
      self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                      nn.BatchNorm2d(planes))

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    return self.relu(self.bn2(self.conv2(out)) + identity)


class TorchResNet(nn.Module):
  """torchvision.models.resnet.ResNet of BasicBlocks, with its parameter names."""

  def __init__(self, layers, num_classes=1000):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    inplanes = 64
    for k, (blocks, planes) in enumerate(zip(layers, (64, 128, 256, 512))):
      stride = 1 if k == 0 else 2
      stage = [TorchBasicBlock(inplanes, planes, stride)]
      stage += [TorchBasicBlock(planes, planes) for _ in range(blocks - 1)]
      setattr(self, f'layer{k + 1}', nn.Sequential(*stage))
      inplanes = planes
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(512, num_classes)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    for k in range(1, 5):
      x = getattr(self, f'layer{k}')(x)
    return self.fc(torch.flatten(self.avgpool(x), 1))


def _random_torch_resnet(layers, num_classes, seed=0):
  """Random weights and BatchNorm statistics (not the identity), in eval mode."""
  torch.manual_seed(seed)
  net = TorchResNet(layers, num_classes)
  with torch.no_grad():
    for module in net.modules():
      if isinstance(module, nn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_(0, 0.1)
        module.running_mean.normal_(0, 0.1)
        module.running_var.uniform_(0.5, 1.5)
  return net.eval()


def _state_dict(net):
  return {k: v.numpy() for k, v in net.state_dict().items()}


@pytest.mark.parametrize('name,layers', [('resnet18', (2, 2, 2, 2)), ('resnet34', (3, 4, 6, 3))])
def test_converted_logits_match_pytorch(name, layers):
  net = _random_torch_resnet(layers, num_classes=10)
  images = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32)  # NCHW
  with torch.no_grad():
    expected = net(torch.from_numpy(images)).numpy()
  model = models.get(name, 10)
  variables = convert.from_torchvision(_state_dict(net), model)
  logits, _ = model.apply(variables, images.transpose(0, 2, 3, 1), train=False)  # NHWC
  assert np.abs(expected).max() > 0.1  # The comparison is not between near-zero logits.
  np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=1e-4)


def test_cli_saves_a_teacher_checkpoint_that_load_variables_restores(tmp_path):
  net = _random_torch_resnet((2, 2, 2, 2), num_classes=1000)
  path = os.fspath(tmp_path / 'resnet18.pth')
  torch.save(net.state_dict(), path)
  output = os.fspath(tmp_path / 'resnet18_flax')
  convert.main(['--state_dict', path, '--model', 'resnet18', '--output', output])
  restored = checkpoints.load_variables(output, models.get('resnet18', 1000), image_size=64)
  expected = convert.from_torchvision(_state_dict(net), models.get('resnet18', 1000))
  chex.assert_trees_all_equal(restored['params'], expected['params'])
  chex.assert_trees_all_equal(restored['batch_stats'], expected['batch_stats'])
  with pytest.raises(ValueError, match='exists'):  # Never overwrites.
    convert.main(['--state_dict', path, '--model', 'resnet18', '--output', output])


def test_num_batches_tracked_is_optional():
  state = _state_dict(_random_torch_resnet((2, 2, 2, 2), 10))
  older = {k: v for k, v in state.items() if not k.endswith('num_batches_tracked')}
  assert len(older) < len(state)
  convert.from_torchvision(older, models.get('resnet18', 10))


@pytest.mark.parametrize('change,message', [
    (lambda s: s.pop('layer3.1.bn2.running_var'), r"missing keys \['layer3.1.bn2.running_var'\]"),
    (lambda s: s.update({'layer5.0.conv1.weight': np.zeros(1)}),
     r"unexpected keys \['layer5.0.conv1.weight'\]"),
    (lambda s: s.update({'fc.weight': np.zeros((7, 512), np.float32)}),
     r'fc.weight: shape \(7, 512\) .* expected \(512, 10\)'),
    (lambda s: s.update({'layer1.0.conv2.weight': np.zeros((64, 64, 1, 1), np.float32)}),
     r'layer1.0.conv2.weight: shape \(64, 64, 1, 1\)'),
])
def test_rejects_state_dicts_that_do_not_fit(change, message):
  state = _state_dict(_random_torch_resnet((2, 2, 2, 2), 10))
  change(state)
  with pytest.raises(ValueError, match=message):
    convert.from_torchvision(state, models.get('resnet18', 10))


def test_resnet34_weights_do_not_fit_resnet18():
  state = _state_dict(_random_torch_resnet((3, 4, 6, 3), 10))
  with pytest.raises(ValueError, match=r"unexpected keys \['layer1.2.bn1.bias'"):
    convert.from_torchvision(state, models.get('resnet18', 10))


def test_rejects_cifar_models():
  with pytest.raises(ValueError, match='ImageNet stem'):
    convert.from_torchvision({}, models.get('resnet20', 10))
