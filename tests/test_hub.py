"""Hub publishing and loading, fully offline.

- a run folder is published as it is: ``--dry-run`` writes its config.json and model.safetensors byte for byte, and
  they load back with ``local-dir:`` bit-identically (memory models and the plain baseline); older single-file
  checkpoints and ``.pth`` state dicts are written in the same layout;
- the same folder placed in a Hugging Face cache loads with ``hf-hub:ORG/NAME`` under ``HF_HUB_OFFLINE=1``
  (in a subprocess, because huggingface_hub reads its environment once, at import);
- the model card renders with the real numbers and parses with ``huggingface_hub.ModelCard``;
- the upload runs through ``huggingface_hub`` against a minimal Hub API served on 127.0.0.1 (create repo,
  preupload, commit) that records what arrives; failed uploads give one clear error.
"""
import base64
import hashlib
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import timm
import yaml
import safetensors.torch
from huggingface_hub import ModelCard
from PIL import Image

import titans_timm  # noqa: F401  (registers the architectures)
from titans_timm import checkpoint as ckpt_io
from titans_timm import hub
from titans_timm.checkpoint import load_model, save_model
from titans_timm.run_record import RunRecord, file_sha256

LABELS = ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot']
EVAL_REPORT = dict(top1=81.25, top5=99.125, topk=5, loss=0.51234, img_per_sec=812.5, dataset='fashion-mnist-mini',
                   split='test', num_samples=1000)
RECIPE = ('model: {model}\npretrained: true\ndataset: fashion-mnist-mini\nepochs: 6\nfreeze_epochs: 2\n'
          'backbone_lr_scale: 0.1\n'
          'lr: 0.0005\nbatch_size: 64\nopt: adamw\nweight_decay: 0.05\nsched: cosine\nmodel_ema: true\n')
SMALL = dict(img_size=32, depth=2, num_classes=10)
FILES = ['README.md', 'config.json', 'model.safetensors']


def make_run(root: Path, architecture: str, with_report: bool = True, **model_args) -> Path:
    """A run folder as titans-timm-train and -eval leave it: config.json, model.safetensors, and run.json with the
    training arguments and (``with_report``) an eval report of these weights."""
    args = dict(SMALL, **model_args)
    model = timm.create_model(architecture, **args)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        # Trained-looking weights: zero-initialised memory gates opened, so the memory changes the logits.
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    run = root / architecture
    run.mkdir(parents=True)
    (run / 'config.json').write_text(ckpt_io.config_json(model, model_args=args, label_names=LABELS,
                                                         data_config=dict(mean=[0.286] * 3, std=[0.353] * 3)))
    (run / 'model.safetensors').write_bytes(ckpt_io.weights_bytes(model))
    record = RunRecord.new(yaml.safe_load(RECIPE.format(model=architecture)))
    if with_report:
        record.add_report(dict(EVAL_REPORT, model=architecture, source=str(run.resolve()),
                               checkpoint_sha256=file_sha256(run / 'model.safetensors')))
    record.save(run)
    return run


class PickledPayload:
    """An arbitrary object: a .pth holding one must be refused, never unpickled."""


def logits(model, seed: int = 1) -> torch.Tensor:
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        return model.eval()(x)


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
    return tmp_path_factory.mktemp('runs')


@pytest.fixture(scope='module')
def mac_run(run_dir):
    return make_run(run_dir, 'vit_tiny_mac_advanced')


@pytest.fixture(scope='module')
def mac_export(mac_run, tmp_path_factory):
    folder = tmp_path_factory.mktemp('export') / 'tiny-mac'
    hub.push(mac_run, 'titans-org/tiny-mac', dry_run_dir=folder)  # report and recipe found next to the checkpoint
    return folder


# --------------------------------------------------------------------------------------------------------------
# export and local-dir load


@pytest.mark.parametrize('architecture,model_args', [
    ('vit_tiny_mac_advanced', {}),
    ('vit_tiny_mag_simple', {}),
    ('vit_tiny_mal_mlp', {}),
    # non-default placement and memory options must survive the trip through config.json
    ('vit_tiny_mal_simple', dict(memory_interval=1, memory_options=dict(chunk_size=8, heads=2))),
    ('vit_tiny_patch16_224', {}),  # the plain backbone baseline of a sweep publishes the same way
])
def test_dry_run_folder_loads_back_identical(run_dir, tmp_path, architecture, model_args):
    run = make_run(run_dir / 'variants', architecture, **model_args)
    result = hub.push(run, 'titans-org/model', dry_run_dir=tmp_path / 'out')  # report and recipe from run.json
    folder = Path(result['folder'])
    assert result['files'] == FILES == sorted(p.name for p in folder.iterdir())  # safetensors only, no pickle
    for name in ('config.json', 'model.safetensors'):  # no conversion: the files trained are the files published
        assert (folder / name).read_bytes() == (run / name).read_bytes(), name
    assert ModelCard.load(folder / 'README.md').data.eval_results[0].metric_value == EVAL_REPORT['top1']
    with safetensors.safe_open(folder / 'model.safetensors', 'pt') as f:
        assert f.metadata() == {'format': 'pt'}  # as transformers / huggingface_hub write it

    config = json.loads((folder / 'config.json').read_text())
    assert config['architecture'] == architecture
    assert config['label_names'] == LABELS
    cfg = config['pretrained_cfg']
    assert cfg['label_names'] == LABELS and cfg['num_classes'] == 10
    assert cfg['input_size'] == [3, 32, 32] and cfg['mean'] == [0.286] * 3 and cfg['std'] == [0.353] * 3
    assert 'tag' not in cfg   # the backbone's tag names other weights
    args = config['model_args']
    assert args['depth'] == 2 and args['num_classes'] == 10
    if architecture != 'vit_tiny_patch16_224':
        expected_blocks = [0, 1] if model_args.get('memory_interval') == 1 else [1]
        assert args['memory_blocks'] == expected_blocks
        assert {'heads', 'head_dim', 'depth', 'expansion'} <= set(args['memory_options'])
        if architecture.endswith(('simple', 'advanced')):
            assert {'chunk_size', 'read_mode', 'momentum', 'max_lr'} <= set(args['memory_options'])
        for key, value in model_args.get('memory_options', {}).items():
            assert args['memory_options'][key] == value

    original, _ = load_model(run)
    reloaded = timm.create_model(f'local-dir:{folder}', pretrained=True)
    assert type(reloaded) is type(original)
    assert torch.equal(logits(reloaded), logits(original))
    assert reloaded.pretrained_cfg['label_names'] == LABELS
    data_cfg = timm.data.resolve_model_data_config(reloaded)
    assert data_cfg['input_size'] == (3, 32, 32) and tuple(data_cfg['mean']) == (0.286,) * 3


def test_old_pth_state_dict_is_read_without_unpickling_code(run_dir, tmp_path):
    run = make_run(run_dir / 'pth', 'vit_tiny_mag_simple')
    original, _ = load_model(run)
    pth = tmp_path / 'old.pth'
    torch.save({'state_dict': original.state_dict(), 'epoch': 3}, pth)
    result = hub.push(pth, 'titans-org/old', dry_run_dir=tmp_path / 'out', architecture='vit_tiny_mag_simple',
                      label_names=LABELS, **SMALL)
    reloaded = timm.create_model(f"local-dir:{result['folder']}", pretrained=True)
    assert torch.equal(logits(reloaded), logits(original))
    with safetensors.safe_open(Path(result['folder']) / 'model.safetensors', 'pt') as f:
        assert f.metadata() == {'format': 'pt'}

    # an older single-file checkpoint (the titans_timm header) with non-default memory arguments: the same layout
    model = timm.create_model('vit_tiny_mal_simple', memory_interval=1, memory_options=dict(chunk_size=8), **SMALL)
    single = save_model(model, tmp_path / 'single' / 'model.safetensors', architecture='vit_tiny_mal_simple',
                        model_args=dict(SMALL, memory_interval=1, memory_options=dict(chunk_size=8)), label_names=LABELS)
    folder = Path(hub.push(single, 'titans-org/single', dry_run_dir=tmp_path / 'out1')['folder'])
    assert sorted(p.name for p in folder.iterdir()) == FILES
    reloaded = timm.create_model(f'local-dir:{folder}', pretrained=True)
    assert reloaded.memory_blocks == model.memory_blocks and torch.equal(logits(reloaded), logits(model))
    assert reloaded.pretrained_cfg['label_names'] == LABELS

    bad = tmp_path / 'unsafe.pth'
    torch.save({'state_dict': original.state_dict(), 'payload': PickledPayload()}, bad)
    with pytest.raises(hub.HubError, match='never unpickled'):
        hub.push(bad, 'titans-org/old', dry_run_dir=tmp_path / 'out2', architecture='vit_tiny_mag_simple', **SMALL)


# --------------------------------------------------------------------------------------------------------------
# hf-hub: load from a pre-populated cache, offline

_LOAD_HF_HUB = '''
import sys, timm, torch, safetensors.torch
import titans_timm
from huggingface_hub import constants
assert constants.HF_HUB_OFFLINE, 'HF_HUB_OFFLINE not seen'
model = timm.create_model(sys.argv[1], pretrained=True).eval()
x = safetensors.torch.load_file(sys.argv[2])['x']
with torch.inference_mode():
    y = model(x)
safetensors.torch.save_file({'y': y.contiguous()}, sys.argv[3])
print(model.pretrained_cfg['source'], model.pretrained_cfg.get('label_names')[0])
'''


def _as_downloaded(folder: Path, cache: Path, repo_id: str) -> Path:
    """Put ``folder``'s files into a Hugging Face cache the way a download of ``repo_id`` would leave them:
    ``models--ORG--NAME/refs/main`` holds a 40-hex commit, ``snapshots/<commit>/`` the files."""
    sha = hashlib.sha1(b''.join(p.name.encode() + p.read_bytes() for p in sorted(folder.iterdir()))).hexdigest()
    repo = cache / ('models--' + repo_id.replace('/', '--'))
    shutil.copytree(folder, repo / 'snapshots' / sha)
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'main').write_text(sha)
    return repo / 'snapshots' / sha


def test_hf_hub_load_from_offline_cache_identical(mac_run, mac_export, tmp_path):
    cache = tmp_path / 'hf_cache'
    snapshot = _as_downloaded(mac_export, cache, 'titans-org/tiny-mac')
    assert {'config.json', 'model.safetensors'} <= {p.name for p in snapshot.iterdir()}

    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    safetensors.torch.save_file({'x': x}, tmp_path / 'x.safetensors')
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / 'hf_home'))
    env.pop('HF_ENDPOINT', None)
    proc = subprocess.run(
        [sys.executable, '-c', _LOAD_HF_HUB, 'hf-hub:titans-org/tiny-mac', str(tmp_path / 'x.safetensors'),
         str(tmp_path / 'y.safetensors')], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ['hf-hub', LABELS[0]]
    original, _ = load_model(mac_run)
    with torch.inference_mode():
        expected = original(x)
    assert torch.equal(safetensors.torch.load_file(tmp_path / 'y.safetensors')['y'], expected)


# --------------------------------------------------------------------------------------------------------------
# model card


def test_card_renders_real_numbers_and_parses(mac_export):
    card = ModelCard.load(mac_export / 'README.md')
    data = card.data
    assert data.library_name == 'timm' and data.pipeline_tag == 'image-classification'
    assert data.license == 'apache-2.0'
    assert data.base_model == 'timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k'
    assert {'image-classification', 'timm', 'titans', 'neural-memory', 'mac', 'advanced-memory'} <= set(data.tags)
    assert data.datasets == ['zalando-datasets/fashion_mnist']
    assert data.metrics == ['accuracy']
    results = {r.metric_name: r.metric_value for r in data.eval_results}
    assert results == {'Top-1 accuracy (%)': 81.25, 'Top-5 accuracy (%)': 99.125}
    # What was evaluated: the built-in validation split is drawn from Fashion-MNIST's *test* split.
    result = data.eval_results[0]
    assert result.dataset_type == 'zalando-datasets/fashion_mnist' and result.dataset_split == 'test'
    assert "1,000-image subset of Fashion-MNIST's test split" in result.dataset_name
    assert '1,000 images evaluated' in result.dataset_name

    text = card.text
    assert ("| fashion-mnist-mini | test (1,000 images of Fashion-MNIST's test split) | 1,000 | 81.25 | 99.12 | "
            "0.5123 | 812.5 |") in text
    assert '**Phase 1** (epochs 1-2)' in text and '**Phase 2** (epochs 3-6)' in text and '0.1x' in text
    assert '| lr | 0.0005 |' in text and '| weight_decay | 0.05 |' in text
    assert 'MAC' in text and '`advanced`' in text and 'block 1 (0-based) of 2' in text
    assert "timm.create_model('hf-hub:titans-org/tiny-mac', pretrained=True)" in text
    assert 'import titans_timm' in text
    assert '2501.00663' in text and 'Dosovitskiy' in text and 'Wightman' in text
    assert '${' not in text


def test_card_front_matter_options(run_dir, tmp_path):
    run = make_run(run_dir / 'no_report', 'vit_tiny_mac_advanced', with_report=False)
    # a report of other weights of the run (last.safetensors) does not describe these
    record = RunRecord.load(run)
    record.eval_reports.append(dict(EVAL_REPORT, source=str(run / 'last.safetensors')))
    record.save(run)
    result = hub.push(run, 'titans-org/tiny-mac', dry_run_dir=tmp_path / 'out', license='mit',
                      base_model='timm/some_other_backbone', datasets=['org/my-data'])
    card = ModelCard.load(Path(result['folder']) / 'README.md')
    assert card.data.license == 'mit'
    assert card.data.base_model == 'timm/some_other_backbone'
    assert card.data.datasets == ['org/my-data']
    # recipe picked up from the run record; no eval report: the card says how to add one
    assert 'freeze_epochs' in card.text and 'titans-timm-eval' in card.text
    assert 'model-index' not in (Path(result['folder']) / 'README.md').read_text()


@pytest.mark.parametrize('recipe,base_model,start', [
    (dict(pretrained=True, epochs=2), 'timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k',
     'starting from the timm checkpoint [timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k]'),
    # the offline main job: memory model started from a backbone trained locally by the same tool
    (dict(pretrained_path='/home/me/output/fashion-backbone/model.safetensors', output='/home/me/output',
          data_dir='/home/me/data', epochs=2, freeze_epochs=1), None,
     'starting from the local checkpoint `fashion-backbone/model.safetensors`'),
    (dict(pretrained=False, epochs=1), None, 'starting from random initialisation'),
])
def test_card_names_a_base_model_only_when_the_weights_descend_from_it(mac_run, tmp_path, recipe, base_model, start):
    result = hub.push(mac_run, 'titans-org/tiny-mac', dry_run_dir=tmp_path / 'out', recipe=recipe)
    text = (Path(result['folder']) / 'README.md').read_text()
    card = ModelCard(text)
    assert card.data.base_model == base_model
    assert start in card.text
    assert '/home/me' not in text  # machine-local paths and dirs are not published


def test_card_does_not_publish_local_dataset_paths(mac_run, tmp_path):
    report = dict(EVAL_REPORT, dataset='/home/me/data/ants_bees', split='val')
    recipe = dict(dataset='/home/me/data/ants_bees', pretrained=True, epochs=1)
    result = hub.push(mac_run, 'titans-org/ants', dry_run_dir=tmp_path / 'out', eval_report=report, recipe=recipe)
    text = (Path(result['folder']) / 'README.md').read_text()
    assert '/home/me' not in text
    card = ModelCard(text)
    assert card.data.datasets == [] and card.data.eval_results[0].dataset_type == 'custom'
    assert '| ants_bees (local image folder) | val | 1,000 | 81.25 |' in card.text
    assert card.data.eval_results[0].dataset_name == \
        'ants_bees (local image folder) (val split), 1,000 images evaluated'


def test_card_claims_no_base_model_without_a_recipe(run_dir, tmp_path):
    """No run record, no --recipe: nothing shows where the weights started, so no base_model is claimed."""
    run = make_run(run_dir / 'no_recipe', 'vit_tiny_mag_simple')
    (run / 'run.json').unlink()
    result = hub.push(run, 'titans-org/x', dry_run_dir=tmp_path / 'out')
    card = ModelCard.load(Path(result['folder']) / 'README.md')
    assert card.data.base_model is None
    assert 'starting point is not recorded' in card.text


@pytest.mark.parametrize('trained,hub_id', [
    # the recipe's exact name and tag decide which checkpoint training loaded
    ('vit_tiny_patch16_224', 'timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k'),
    ('vit_tiny_patch16_224.augreg_in21k', 'timm/vit_tiny_patch16_224.augreg_in21k'),
])
def test_card_base_model_is_the_checkpoint_the_recipe_loaded(run_dir, tmp_path, trained, hub_id):
    run = make_run(run_dir / 'tagged' / trained, 'vit_tiny_patch16_224')
    result = hub.push(run, 'titans-org/x', dry_run_dir=tmp_path / 'out', recipe=dict(model=trained, pretrained=True,
                                                                                      epochs=1))
    assert ModelCard.load(Path(result['folder']) / 'README.md').data.base_model == hub_id


@pytest.mark.parametrize('architecture,hub_id', [
    ('vit_base_patch32_224', 'timm/vit_base_patch32_224.augreg_in21k_ft_in1k'),
    ('vit_small_patch16_384', 'timm/vit_small_patch16_384.augreg_in21k_ft_in1k'),
    ('vit_base_patch16_clip_224', 'timm/vit_base_patch16_clip_224.laion2b_ft_in12k_in1k'),
    ('vit_small_patch16_224.dino', 'timm/vit_small_patch16_224.dino'),
    ('vit_base_mac_simple', 'timm/vit_base_patch16_224.augreg2_in21k_ft_in1k'),
    ('not_a_model', None),
])
def test_backbone_hub_id_maps_names_exactly(architecture, hub_id):
    """Other timm ViTs of a size are not the size's patch16/224 checkpoint."""
    assert hub.backbone_hub_id(architecture) == hub_id


def test_backbone_ids_and_dataset_ids():
    assert hub.backbone_hub_id('vit_small_mag_simple') == 'timm/vit_small_patch16_224.augreg_in21k_ft_in1k'
    assert hub.backbone_hub_id('vit_base_mal_mlp') == 'timm/vit_base_patch16_224.augreg2_in21k_ft_in1k'
    assert hub.backbone_hub_id('vit_tiny_patch16_224') == 'timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k'
    assert hub.backbone_hub_id('resnet50') == 'timm/resnet50.a1_in1k'  # what pretrained=True loads
    assert hub.dataset_hub_id('hfds/uoft-cs/cifar100') == 'uoft-cs/cifar100'
    assert hub.dataset_hub_id('hf:zh-plus/tiny-imagenet') == 'zh-plus/tiny-imagenet'
    assert hub.dataset_hub_id('fashion-mnist-mini') == 'zalando-datasets/fashion_mnist'
    assert hub.dataset_hub_id('/data/ants_bees') is None


# --------------------------------------------------------------------------------------------------------------
# upload through huggingface_hub against a local Hub API


class FakeHub(http.server.ThreadingHTTPServer):
    """Just enough of the Hub API for create_repo + upload_folder; records every request it receives."""

    def __init__(self, token='hf_test_token'):
        super().__init__(('127.0.0.1', 0), _FakeHubHandler)
        self.token = token
        self.requests = []
        self.files = {}
        self.repos = []
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self):
        return f'http://127.0.0.1:{self.server_address[1]}'

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()


class _FakeHubHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass

    def _reply(self, status, payload):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(body)))
        if status >= 400:
            self.send_header('X-Error-Message', payload.get('error', ''))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.server.requests.append(('GET', self.path, None))
        self._reply(404, {'error': 'not found'})

    do_HEAD = do_GET

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get('Content-Length') or 0))
        path = self.path.split('?')[0]
        self.server.requests.append(('POST', path, self.headers.get('Authorization')))
        if self.headers.get('Authorization') != f'Bearer {self.server.token}':
            return self._reply(401, {'error': 'Invalid credentials in Authorization header'})
        if path == '/api/repos/create':
            payload = json.loads(body)
            repo_id = f"{payload['organization']}/{payload['name']}"
            self.server.repos.append(payload)
            return self._reply(200, {'url': f'{self.server.url}/{repo_id}', 'name': repo_id, 'id': 'x'})
        if path == '/api/validate-yaml':  # the Hub checks a README's front matter before the upload
            content = json.loads(body)['content']
            front = yaml.safe_load(content.split('---\n')[1])
            self.server.card_front_matter = front
            if not isinstance(front, dict) or front.get('library_name') != 'timm':
                return self._reply(400, {'error': 'invalid model card metadata'})
            return self._reply(200, {'warnings': []})
        m = re.fullmatch(r'/api/models/([\w.-]+/[\w.-]+)/(preupload|commit)/(\w+)', path)
        if not m:
            return self._reply(404, {'error': f'no route {path}'})
        repo_id, action, revision = m.groups()
        if action == 'preupload':
            files = json.loads(body)['files']
            return self._reply(200, {'files': [
                {'path': f['path'], 'uploadMode': 'regular', 'shouldIgnore': False} for f in files]})
        for line in body.decode().splitlines():
            item = json.loads(line)
            if item['key'] == 'header':
                self.server.commit_header = item['value']
            elif item['key'] == 'file':
                assert item['value']['encoding'] == 'base64'
                self.server.files[item['value']['path']] = base64.b64decode(item['value']['content'])
        return self._reply(200, {'commitUrl': f'{self.server.url}/{repo_id}/commit/{"a" * 40}',
                                 'commitOid': 'a' * 40, 'success': True})


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_card_labels_top_k_and_usage_for_few_classes(run_dir, tmp_path):
    """With 3 classes the evaluator reports top-3; the card says so and its usage snippet runs."""
    labels = ['cat', 'dog', 'car']
    model = timm.create_model('vit_tiny_mag_simple', img_size=32, depth=2, num_classes=3)
    ckpt = run_dir / 'three' / 'model.safetensors'
    save_model(model, ckpt, architecture='vit_tiny_mag_simple', model_args=dict(img_size=32, depth=2, num_classes=3),
               label_names=labels)
    report = dict(EVAL_REPORT, dataset='hf:org/three', split='validation', top5=100.0, topk=3, num_samples=30)
    result = hub.push(ckpt, 'titans-org/three', dry_run_dir=tmp_path / 'out', eval_report=report)
    folder = Path(result['folder'])
    card = ModelCard.load(folder / 'README.md')
    assert {r.metric_name for r in card.data.eval_results} == {'Top-1 accuracy (%)', 'Top-3 accuracy (%)'}
    assert '| Dataset | Split | Images | Top-1 (%) | Top-3 (%) |' in card.text and 'Top-5' not in card.text
    # The usage snippet, as a user would paste it (from the exported folder instead of the Hub).
    snippet = card.text.split('```python\n', 1)[1].split('```', 1)[0]
    snippet = snippet.replace("'hf-hub:titans-org/three'", repr(f'local-dir:{folder}'))
    scope = dict(img=Image.new('RGB', (40, 40), (120, 30, 200)))
    exec(snippet, scope)
    assert scope['top_idx'].shape == (1, 3) and scope['labels'] == labels


def test_auto_picked_report_must_describe_the_current_weights(run_dir, tmp_path, capsys):
    """A report in the run record is used only while the weights are those it evaluated."""
    run = make_run(run_dir / 'retrained', 'vit_tiny_mag_simple')
    first = hub.push(run, 'titans-org/x', dry_run_dir=tmp_path / 'a')
    assert ModelCard.load(Path(first['folder']) / 'README.md').data.eval_results is not None
    # Retrained into the same folder: same path, new weights; the old report stays in the record.
    model, _ = load_model(run)
    with torch.no_grad():
        model.head.bias.add_(1.0)
    (run / 'model.safetensors').write_bytes(ckpt_io.weights_bytes(model))
    capsys.readouterr()
    second = hub.push(run, 'titans-org/x', dry_run_dir=tmp_path / 'b')
    text = (Path(second['folder']) / 'README.md').read_text()
    assert 'model-index' not in text and '81.25' not in text
    err = capsys.readouterr().err
    assert 'note: not using' in err and 'evaluated other weights' in err
    # Passed explicitly, the stale report is one clear error.
    report = tmp_path / 'stale_report.json'
    report.write_text(json.dumps(RunRecord.load(run).eval_reports[0]))
    with pytest.raises(hub.HubError, match='does not describe this checkpoint: it evaluated other weights'):
        hub.push(run, 'titans-org/x', dry_run_dir=tmp_path / 'c', eval_report=report)
    assert hub.main([str(run), 'titans-org/x', '--dry-run', str(tmp_path / 'd'), '--eval-report', str(report)]) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: --eval-report') and err.count('\n') == 1
    # A report without a sha256 (an older titans-timm-eval) is not picked up either.
    record = RunRecord.load(run)
    record.eval_reports = [dict(EVAL_REPORT, source=str(run.resolve()))]
    record.save(run)
    third = hub.push(run, 'titans-org/x', dry_run_dir=tmp_path / 'e')
    assert 'model-index' not in (Path(third['folder']) / 'README.md').read_text()
    assert 'no checkpoint_sha256' in capsys.readouterr().err


def test_dry_run_into_the_checkpoint_folder_is_refused(run_dir, tmp_path, capsys):
    run = make_run(run_dir / 'selfdir', 'vit_tiny_mag_simple', with_report=False)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    for checkpoint in (run, run / 'model.safetensors'):
        assert hub.main([str(checkpoint), 'titans-org/x', '--dry-run', str(run)]) == 2
        err = capsys.readouterr().err
        assert err.startswith('error: --dry-run') and 'would overwrite' in err and err.count('\n') == 1
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    # a folder above the checkpoint's is refused for what it is: a folder with other files in it
    above = run_dir / 'above'
    inner = make_run(above / 'run', 'vit_tiny_mag_simple', with_report=False)
    assert hub.main([str(inner), 'titans-org/x', '--dry-run', str(above)]) == 2
    assert 'already holds other files (run)' in capsys.readouterr().err


def test_upload_sends_exactly_the_dry_run_folder(mac_run, mac_export):
    with FakeHub() as server:
        result = hub.push(mac_run, 'titans-org/tiny-mac', token='hf_test_token', endpoint=server.url,
                          private=True)
    assert len(server.repos) == 1
    assert server.repos[0]['name'] == 'tiny-mac' and server.repos[0]['organization'] == 'titans-org'
    assert server.repos[0].get('private') is True or server.repos[0].get('visibility') == 'private'
    assert server.card_front_matter['base_model'] == 'timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k'
    assert all(auth == 'Bearer hf_test_token' for _, _, auth in server.requests)
    posts = [path for method, path, _ in server.requests if method == 'POST']
    assert posts[0] == '/api/repos/create'
    assert posts[-1] == '/api/models/titans-org/tiny-mac/commit/main'
    assert sorted(server.files) == FILES
    for name in FILES:  # byte for byte what --dry-run wrote
        assert server.files[name] == (mac_export / name).read_bytes(), name
    assert server.files['model.safetensors'] == (mac_run / 'model.safetensors').read_bytes()  # the trained weights
    assert result['commit_oid'] == 'a' * 40 and result['repo_id'] == 'titans-org/tiny-mac'
    assert 'vit_tiny_mac_advanced' in server.commit_header['summary']


def test_cli_push_uses_hf_endpoint_and_hf_token(mac_run, tmp_path):
    """The console script, configured the way users do it: HF_ENDPOINT and HF_TOKEN in the environment."""
    with FakeHub(token='hf_env_token') as server:
        env = dict(os.environ, HF_ENDPOINT=server.url, HF_TOKEN='hf_env_token', HF_HOME=str(tmp_path / 'home'))
        env.pop('HF_HUB_OFFLINE', None)
        proc = subprocess.run([sys.executable, '-m', 'titans_timm.hub', str(mac_run), 'titans-org/cli-model'],
                              env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f'pushed README.md, config.json, model.safetensors to {server.url}/titans-org/cli-model' in proc.stdout
    assert sorted(server.files) == FILES


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    from huggingface_hub import constants
    monkeypatch.delenv('HF_TOKEN', raising=False)
    monkeypatch.delenv('HUGGING_FACE_HUB_TOKEN', raising=False)
    monkeypatch.setattr(constants, 'HF_TOKEN_PATH', str(tmp_path / 'no_token'))


def test_upload_without_token_fails_clearly(mac_run, no_token, capsys):
    with pytest.raises(hub.HubError, match=r'no Hugging Face token: run `hf auth login`, set HF_TOKEN'):
        hub.push(mac_run, 'titans-org/tiny-mac', endpoint='http://127.0.0.1:9')
    assert hub.main([str(mac_run), 'titans-org/tiny-mac']) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: no Hugging Face token') and err.count('\n') == 1 and 'Traceback' not in err


def test_upload_to_unreachable_endpoint_fails_clearly(mac_run, capsys):
    url = f'http://127.0.0.1:{_free_port()}'  # nothing listens there
    with pytest.raises(hub.HubError, match=f'cannot reach the Hugging Face Hub at {url}.*--dry-run DIR'):
        hub.push(mac_run, 'titans-org/tiny-mac', token='hf_x', endpoint=url)
    assert hub.main([str(mac_run), 'titans-org/tiny-mac', '--token', 'hf_x', '--endpoint', url]) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: cannot reach') and err.count('\n') == 1


def test_upload_with_rejected_token_fails_clearly(mac_run):
    with FakeHub(token='the-right-token') as server:
        with pytest.raises(hub.HubError, match='refused the token.*HF_TOKEN'):
            hub.push(mac_run, 'titans-org/tiny-mac', token='a-wrong-token', endpoint=server.url)
    assert server.files == {}


def test_upload_in_offline_mode_fails_clearly(mac_run, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    with pytest.raises(hub.HubError, match='HF_HUB_OFFLINE is set'):
        hub.push(mac_run, 'titans-org/tiny-mac', token='hf_x', endpoint='http://127.0.0.1:9')


# --------------------------------------------------------------------------------------------------------------
# bad input


def test_bad_input_gives_one_clear_error(mac_run, tmp_path, capsys):
    assert hub.main([str(tmp_path / 'missing.safetensors'), 'titans-org/x', '--dry-run', str(tmp_path / 'o')]) == 2
    assert capsys.readouterr().err.startswith('error: checkpoint not found')
    with pytest.raises(hub.HubError, match='ORG/NAME'):
        hub.push(mac_run, 'not a repo id', dry_run_dir=tmp_path / 'o')
    (tmp_path / 'report.json').write_text(json.dumps({'loss': 1.0}))
    with pytest.raises(hub.HubError, match="no top-1 accuracy"):
        hub.push(mac_run, 'titans-org/x', dry_run_dir=tmp_path / 'o2', eval_report=tmp_path / 'report.json')
    assert not (tmp_path / 'o2').exists()  # nothing written before the inputs were checked
    (tmp_path / 'busy').mkdir()
    (tmp_path / 'busy' / 'notes.txt').write_text('mine')
    with pytest.raises(hub.HubError, match=r'already holds other files \(notes.txt\)'):
        hub.push(mac_run, 'titans-org/x', dry_run_dir=tmp_path / 'busy')
    (tmp_path / 'bad.md').write_text('${not_a_field}')
    with pytest.raises(hub.HubError, match=r'placeholder \$\{not_a_field\}'):
        hub.push(mac_run, 'titans-org/x', dry_run_dir=tmp_path / 'o3', card_template=tmp_path / 'bad.md')


def test_card_template_is_found_in_the_installed_layouts():
    """The shipped template is found from the source tree (editable installs) and from package data (wheels)."""
    text = hub.load_card_template()
    assert text.startswith('---\n${card_data}\n---\n')  # front matter: huggingface_hub's ModelCardData
    candidates = [str(c) for c in hub._template_candidates('model_card.md')]
    assert any(c.endswith(os.path.join('titans_timm', 'hub_cards', 'model_card.md')) for c in candidates)
    assert any(Path(c).is_file() for c in candidates)


def test_wheel_ships_the_card_template(tmp_path):
    """``pip install titans-timm`` (a wheel, no source tree) must still find hub_cards/model_card.md."""
    import zipfile
    root = Path(__file__).resolve().parent.parent
    src = tmp_path / 'src'
    src.mkdir()
    for name in ('setup.cfg', 'pyproject.toml', 'README.md'):
        shutil.copy(root / name, src / name)
    for name in ('titans_timm', 'hub_cards', 'train_timm_hparams'):
        shutil.copytree(root / name, src / name,
                        ignore=shutil.ignore_patterns('__pycache__', '*.parquet', '*.safetensors'))
    proc = subprocess.run(
        [sys.executable, '-c', f'from setuptools import build_meta; print(build_meta.build_wheel({str(tmp_path)!r}))'],
        cwd=src, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheel = tmp_path / proc.stdout.strip().splitlines()[-1]
    names = zipfile.ZipFile(wheel).namelist()
    assert 'titans_timm/hub.py' in names
    assert 'titans_timm/hub_cards/model_card.md' in names, (
        'the wheel lacks the card template: setup.cfg must map hub_cards/ into the package '
        '(package_dir titans_timm.hub_cards = hub_cards, package_data titans_timm.hub_cards = *.md)')
    # titans-timm-quickstart's default recipe comes with the wheel too
    assert 'titans_timm/recipes/fashion_mnist_transfer.yaml' in names
