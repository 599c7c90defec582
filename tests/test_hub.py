"""Hub publishing and loading, all offline: export -> local-dir:, a primed Hugging Face cache with HF_HUB_OFFLINE
serving hf-hub: and registry names, a fake HfApi receiving pushes, model cards, README table, and clear errors for
corrupt weights, unknown architectures and mismatched shapes."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from safetensors.torch import load_file

import timm
import timm_asge  # noqa: F401  (registers the models)
from timm_asge import hub
from timm_asge.checkpoint import CheckpointError, checkpoint_filter_fn

MNIST_LABELS = tuple(str(i) for i in range(10))

ROOT = Path(__file__).resolve().parent.parent
CARDS = ROOT / 'hub_cards'
REPO_ID = 'timm-asge/asge_cnn_tiny.digits'
ACCURACY = {'fusion': 0.9611111111111111, 'last': 0.95, 'best': 0.9527777777777777}
COMMIT = '0123456789abcdef0123456789abcdef01234567'


def _model(prediction='fusion', best_block=None, **kwargs):
    torch.manual_seed(0)
    model = timm.create_model('asge_cnn_tiny', **kwargs).eval()
    model.set_prediction(prediction, best_block)
    return model


def _make_run(root: Path, model, dataset_hub_id=None, name='digits') -> Path:
    """A training output folder as recipes/train.py writes it."""
    run = root / 'run'
    hub.save_pretrained(model, run / 'export', label_names=MNIST_LABELS)
    strategies = {k: {'test_accuracy': v, 'params': 123_456, 'flops': 4_567_890, 'activation_bytes': 98_304}
                  for k, v in ACCURACY.items()}
    results = {
        'model': 'asge_cnn_tiny',
        'dataset': {'name': name, 'hub_id': dataset_hub_id, 'num_classes': 10, 'label_names': list(MNIST_LABELS),
                    'splits': {'train': 1293, 'validation': 144, 'test': 360}},
        'recipe': {'name': name, 'model': {'name': 'asge_cnn_tiny', 'prediction': model.prediction},
                   'train': {'epochs': 40, 'lr': 0.002}},
        'config_file': 'recipes/configs/digits.yaml',
        'command': 'accelerate launch recipes/train.py --config recipes/configs/digits.yaml',
        'commit': 'deadbeef', 'hardware': '2 CPU cores (test)', 'epochs': 40, 'train_time_s': 61.25,
        'best_epoch': 37, 'best_block': model.best_block if model.best_block is not None else 2,
        'prediction': model.prediction, 'test_accuracy': dict(ACCURACY), 'strategies': strategies,
    }
    (run / 'results.json').write_text(json.dumps(results))
    return run


def _metadata(tmp_path: Path, name='asge_cnn_tiny.digits') -> Path:
    path = tmp_path / f'{name}.yaml'
    shutil.copyfile(CARDS / f'{name}.yaml', path)
    return path


def _prime_cache(cache: Path, repo_id: str, folder: Path, commit: str = COMMIT) -> None:
    """Lay ``folder`` out as huggingface_hub's cache holds a downloaded repo snapshot."""
    repo = cache / ('models--' + repo_id.replace('/', '--'))
    (repo / 'refs').mkdir(parents=True, exist_ok=True)
    (repo / 'refs' / 'main').write_text(commit)
    snapshot = repo / 'snapshots' / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        shutil.copyfile(f, snapshot / f.name)


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')


@pytest.fixture
def x():
    return torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def exported(tmp_path):
    """(model, run dir, exported Hub folder) for a `best`-strategy model."""
    model = _model('best', 2)
    run = _make_run(tmp_path, model)
    out = hub.export(run, tmp_path / 'hub' / 'asge_cnn_tiny.digits', metadata=_metadata(tmp_path))
    return model, run, out


class FakeHfApi:
    """Stands in for huggingface_hub.HfApi: records calls, 'uploads' into a huggingface_hub cache layout."""
    instances = []
    cache: Path = None

    def __init__(self, token=None, library_name=None, **kwargs):
        self.token, self.library_name, self.calls = token, library_name, []
        FakeHfApi.instances.append(self)

    def create_repo(self, repo_id, private=False, exist_ok=False, **kwargs):
        self.calls.append(('create_repo', repo_id, dict(private=private, exist_ok=exist_ok)))
        return huggingface_hub.RepoUrl(f'https://huggingface.co/{repo_id}')

    def upload_folder(self, repo_id, folder_path, allow_patterns=None, commit_message=None, **kwargs):
        files = sorted(p.name for p in Path(folder_path).iterdir()
                       if allow_patterns is None or p.name in allow_patterns)
        self.calls.append(('upload_folder', repo_id, files))
        staged = Path(folder_path).parent / '.fake_upload'
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir()
        for name in files:
            shutil.copyfile(Path(folder_path) / name, staged / name)
        _prime_cache(FakeHfApi.cache, repo_id, staged, commit='f' * 40)
        return huggingface_hub.CommitInfo(
            commit_url=f'https://huggingface.co/{repo_id}/commit/{"f" * 40}', commit_message=commit_message,
            commit_description='', oid='f' * 40)


@pytest.fixture
def fake_api(monkeypatch, tmp_path):
    FakeHfApi.instances = []
    FakeHfApi.cache = tmp_path / 'hf_cache'
    monkeypatch.setattr(hub, 'HfApi', FakeHfApi)
    return FakeHfApi


# --- export and local-dir ------------------------------------------------------------------------------------------

@pytest.mark.parametrize('prediction,best_block', [('fusion', None), ('best', 2), ('last', None)])
@torch.no_grad()
def test_export_local_dir_bit_identical(tmp_path, x, prediction, best_block):
    model = _model(prediction, best_block)
    run = _make_run(tmp_path, model)
    out = hub.export(run, tmp_path / 'out', metadata=_metadata(tmp_path))

    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    assert (out / 'model.safetensors').read_bytes() == (run / 'export' / 'model.safetensors').read_bytes()
    loaded = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    assert loaded.prediction == prediction and loaded.best_block == model.best_block
    assert torch.equal(loaded(x), model(x))
    for strategy in ('fusion', 'last'):
        model.set_prediction(strategy)
        loaded.set_prediction(strategy)
        assert torch.equal(loaded(x), model(x))


def test_exported_config_is_timm_format(exported):
    model, _, out = exported
    config = json.loads((out / 'config.json').read_text())
    assert config['architecture'] == 'asge_cnn_tiny'
    assert config['model_args'] == model.architecture_args()  # every architecture option, incl. the strategy
    assert config['model_args']['prediction'] == 'best' and config['model_args']['best_block'] == 2
    assert config['label_names'] == list(MNIST_LABELS)
    cfg = config['pretrained_cfg']
    assert cfg['tag'] == 'digits' and cfg['input_size'] == [1, 16, 16]
    assert cfg['mean'] == [0.0] and cfg['std'] == [1.0] and cfg['num_classes'] == 10
    assert not {'file', 'hf_hub_id', 'source', 'url'} & set(cfg)
    weights = load_file(out / 'model.safetensors')
    for i in range(4):  # the fixed projections travel with the weights
        assert torch.equal(weights[f'stages.{i}.proj.weight'], model.stages[i].proj.weight)
    assert int(weights['best_block']) == 2


# --- primed cache, HF_HUB_OFFLINE ----------------------------------------------------------------------------------

@torch.no_grad()
def test_hf_hub_from_primed_cache_offline(exported, tmp_path, x, offline):
    model, _, out = exported
    cache = tmp_path / 'hf_cache'
    _prime_cache(cache, REPO_ID, out)

    loaded = timm.create_model(f'hf-hub:{REPO_ID}', pretrained=True, cache_dir=cache).eval()
    assert loaded.pretrained_cfg['hf_hub_id'] == REPO_ID
    assert loaded.prediction == 'best'
    assert torch.equal(loaded(x), model(x))
    checked = hub.create_model_checked(f'hf-hub:{REPO_ID}', cache_dir=cache).eval()
    assert torch.equal(checked(x), model(x))

    with pytest.raises(huggingface_hub.errors.LocalEntryNotFoundError):  # not cached + offline: no download try
        timm.create_model('hf-hub:timm-asge/not-cached', pretrained=True, cache_dir=cache)


@torch.no_grad()
def test_registry_name_from_primed_cache_offline(exported, tmp_path, x, offline):
    model, _, out = exported
    cache = tmp_path / 'hf_cache'
    _prime_cache(cache, REPO_ID, out)
    assert timm.models.get_pretrained_cfg('asge_cnn_tiny.digits').hf_hub_id == REPO_ID

    loaded = timm.create_model('asge_cnn_tiny.digits', pretrained=True, cache_dir=cache).eval()
    # A registry-name load uses the entrypoint's default strategy; the chosen block travels in the weights.
    assert loaded.prediction == 'fusion' and loaded.best_block == 2
    model.set_prediction('fusion')
    assert torch.equal(loaded(x), model(x))
    loaded.set_prediction('best')
    model.set_prediction('best')
    assert torch.equal(loaded(x), model(x))
    checked = hub.create_model_checked('asge_cnn_tiny.digits', cache_dir=cache).eval()
    checked.set_prediction('best')
    assert torch.equal(checked(x), model(x))
    # The card says so, and how to get the published strategy back.
    assert "model.set_prediction('best')" in (out / 'README.md').read_text()


# --- push ----------------------------------------------------------------------------------------------------------

@torch.no_grad()
def test_push_fake_hfapi_round_trip(tmp_path, x, fake_api, offline):
    model = _model('best', 1)
    run = _make_run(tmp_path, model)
    repo_id = 'someone/asge-digits'
    out = hub.export(run, tmp_path / 'out', metadata=_metadata(tmp_path), repo_id=repo_id)
    (out / 'notes.txt').write_text('not part of the repo')

    result = hub.push(out, repo_id, token='hf_test_token')
    assert not result.dry_run and result.repo_id == repo_id
    api, = fake_api.instances
    assert api.token == 'hf_test_token' and api.library_name == 'timm'
    assert api.calls[0] == ('create_repo', repo_id, dict(private=False, exist_ok=True))
    assert api.calls[1] == ('upload_folder', repo_id, ['README.md', 'config.json', 'model.safetensors'])

    loaded = timm.create_model(f'hf-hub:{repo_id}', pretrained=True, cache_dir=fake_api.cache).eval()
    assert torch.equal(loaded(x), model(x))
    card = ModelCard.load(fake_api.cache / 'models--someone--asge-digits' / 'snapshots' / ('f' * 40) / 'README.md')
    assert f"hf-hub:{repo_id}" in card.text


def test_push_dry_run_uploads_nothing(exported, fake_api, capsys):
    _, _, out = exported
    result = hub.push(out, REPO_ID, dry_run=True)
    assert result.dry_run and result.files == ['config.json', 'model.safetensors', 'README.md']
    assert hub.main(['push', str(out), '--repo-id', REPO_ID, '--dry-run']) == 0
    assert 'nothing was uploaded' in capsys.readouterr().out
    assert fake_api.instances == []  # no HfApi was even created


def test_push_refuses_bad_folders(exported, tmp_path, fake_api):
    _, _, out = exported
    with pytest.raises(hub.HubError, match='export again with --repo-id other/name'):
        hub.push(out, 'other/name', dry_run=True)
    with pytest.raises(hub.HubError, match='invalid repo id|needs an owner'):
        hub.push(out, 'no-owner', dry_run=True)
    (out / 'pytorch_model.bin').write_bytes(b'pickle')
    with pytest.raises(hub.HubError, match='pickle-based'):
        hub.push(out, REPO_ID)
    (out / 'pytorch_model.bin').unlink()
    (out / 'model.safetensors').write_bytes((out / 'model.safetensors').read_bytes()[:1000])
    with pytest.raises(CheckpointError, match='corrupt or truncated'):
        hub.push(out, REPO_ID)
    assert fake_api.instances == []


def test_push_to_a_pull_request_does_not_mark_published(exported, tmp_path, fake_api, capsys):
    """A registry name loads from main: an upload to a PR or another branch leaves the metadata unpublished."""
    _, _, out = exported
    metadata = _metadata(tmp_path)
    for extra in (['--create-pr'], ['--revision', 'draft']):
        assert hub.main(['push', str(out), '--repo-id', REPO_ID, '--metadata', str(metadata)] + extra) == 0
        assert 'not marked published' in capsys.readouterr().out
        assert not hub.load_metadata(metadata).get('published')
    assert hub.main(['push', str(out), '--repo-id', REPO_ID, '--metadata', str(metadata)]) == 0
    assert hub.load_metadata(metadata)['published'] is True


def test_push_refuses_a_card_that_does_not_parse(exported):
    _, _, out = exported
    readme = out / 'README.md'
    readme.write_text(readme.read_text().replace('---\n', '---\nlicense: [unclosed\n', 1))
    with pytest.raises(hub.HubError, match='not a valid model card.*timm_asge.hub export'):
        hub.push(out, REPO_ID, dry_run=True)


def test_python_m_push_dry_run(exported):
    _, _, out = exported
    proc = subprocess.run(
        [sys.executable, '-m', 'timm_asge.hub', 'push', str(out), '--repo-id', REPO_ID, '--dry-run'],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
        env={'HF_HUB_OFFLINE': '1', 'PATH': '/usr/bin:/bin', 'HOME': str(out.parent)})
    assert proc.returncode == 0, proc.stderr
    assert 'would upload config.json, model.safetensors, README.md' in proc.stdout


# --- model card ----------------------------------------------------------------------------------------------------

def test_card_metadata_and_model_index(tmp_path):
    model = _model('best', 2)
    run = _make_run(tmp_path, model, dataset_hub_id='ylecun/mnist', name='mnist')
    meta = {'name': 'asge_cnn_tiny.mnist_demo', 'repo_id': 'someone/asge_cnn_tiny.mnist_demo', 'license': 'mit',
            'dataset': {'title': 'MNIST'}, 'paper': {'accuracy': 99.65, 'network': 'ASGE VGG8'}}
    out = hub.export(run, tmp_path / 'out', metadata=meta)
    results = json.loads((run / 'results.json').read_text())

    card = ModelCard.load(out / 'README.md')
    data = card.data
    assert data.library_name == 'timm' and data.license == 'mit' and data.pipeline_tag == 'image-classification'
    assert {'forward-forward', 'image-classification', 'timm'} <= set(data.tags) and 'transformers' not in data.tags
    assert data.datasets == ['ylecun/mnist']
    assert data.model_name == 'asge_cnn_tiny.mnist_demo'
    by_name = {r.metric_name: r for r in data.eval_results}
    assert set(by_name) == {f'Top-1 accuracy ({s})' for s in ('fusion', 'last', 'best')}
    for strategy, value in results['test_accuracy'].items():
        r = by_name[f'Top-1 accuracy ({strategy})']
        assert r.metric_value == value  # exact, not rounded
        assert r.metric_type == 'accuracy' and r.dataset_type == 'ylecun/mnist' and r.dataset_split == 'test'
        assert r.task_type == 'image-classification'
        assert f'| `{strategy}` | {100 * value:.2f} |' in card.text
    assert '| paper (ASGE VGG8) | 99.65 |' in card.text
    assert "timm.create_model('hf-hub:someone/asge_cnn_tiny.mnist_demo', pretrained=True)" in card.text
    assert 'import timm_asge' in card.text
    assert results['command'] in card.text and 'recipes/configs/digits.yaml' in card.text
    assert ('python recipes/validate.py --model hf-hub:someone/asge_cnn_tiny.mnist_demo --config '
            'recipes/configs/digits.yaml') in card.text  # how to check the table
    assert 'lr: 0.002' in card.text  # the resolved recipe
    assert '@inproceedings{gong2026asge' in card.text and '2509.12394' in card.text
    # Not a registry name (tag mnist_demo): the card must not promise a registry-name load.
    assert "timm.create_model('asge_cnn_tiny.mnist_demo'" not in card.text


def test_record_then_regenerate_card_from_metadata(exported, tmp_path, capsys):
    _, run, _ = exported
    meta_path = _metadata(tmp_path)
    out = hub.export(run, tmp_path / 'out2', metadata=meta_path, record=True)
    meta = yaml.safe_load(meta_path.read_text())
    results = json.loads((run / 'results.json').read_text())
    assert meta['results']['test_accuracy'] == results['test_accuracy']
    assert meta['hardware'] == results['hardware'] and meta['commit'] == results['commit']
    assert meta_path.read_text().startswith('# Card metadata')  # the explanatory header survives
    assert hub.main(['card', str(meta_path)]) == 0
    assert capsys.readouterr().out == (out / 'README.md').read_text()


# --- loading into another num_classes / in_chans -------------------------------------------------------------------

@torch.no_grad()
def test_load_into_other_num_classes(exported, x):
    model, _, out = exported
    for create in (timm.create_model, hub.create_model_checked):
        kwargs = dict(pretrained=True) if create is timm.create_model else {}
        adapted = create(f'local-dir:{out}', num_classes=5, **kwargs).eval()
        fresh = _model(num_classes=5)
        assert adapted.num_classes == 5 and adapted(x).shape == (4, 5)
        assert adapted.head.fc.weight.shape == (5, model.head.fc.in_features)
        for i, block in enumerate(adapted.stages):
            assert torch.equal(block.conv.weight, model.stages[i].conv.weight)  # features kept
            assert block.proj.weight.shape == (model.stages[i].proj.in_features, 5)
            assert torch.equal(block.proj.weight, fresh.stages[i].proj.weight)  # fresh projection, same seed
        assert adapted.prediction == 'best' and adapted.best_block == 2


@torch.no_grad()
def test_load_into_three_channels(exported, x):
    model, _, out = exported
    for adapted in (timm.create_model(f'local-dir:{out}', pretrained=True, in_chans=3).eval(),
                    hub.create_model_checked(f'local-dir:{out}', in_chans=3).eval()):
        assert adapted.stages[0].conv.weight.shape == (32, 3, 3, 3)
        # Grey images copied to 3 channels give the original logits (weights repeated and scaled by 1/3).
        torch.testing.assert_close(adapted(x.expand(-1, 3, -1, -1)), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('in_chans', [1, 3, 4])
def test_first_conv_adaptation_on_older_timm(exported, monkeypatch, in_chans):
    """Older timm (1.0.29) converts first convs only from 3 channels; the filter hands it weights it can convert."""
    from timm.models import adapt_input_conv
    from timm_asge import checkpoint

    model, _, out = exported
    monkeypatch.setattr(checkpoint, '_TIMM_ADAPTS_ANY_CHANNELS', False)
    grey = load_file(out / 'model.safetensors')['stages.0.conv.weight']  # (32, 1, 3, 3)
    target = timm.create_model(f'local-dir:{out}', in_chans=in_chans)
    filtered = checkpoint_filter_fn(load_file(out / 'model.safetensors'), target)['stages.0.conv.weight']
    # What old timm then does: nothing for 3 channels, else adapt_input_conv from 3 (its only source count).
    loaded = filtered if in_chans == 3 else adapt_input_conv(in_chans, filtered)
    # Grey images copied to every channel give the original response: the weights are shared out evenly.
    torch.testing.assert_close(loaded, grey.expand(-1, in_chans, -1, -1) / in_chans)


def test_own_first_conv_of_other_channel_counts_on_older_timm(tmp_path, monkeypatch):
    """Older timm would re-initialise a 4-channel model's own first conv at random: refused, saying why."""
    from timm_asge import checkpoint

    model = _model(in_chans=4)
    hub.save_pretrained(model, tmp_path / 'rgba')
    state_dict = load_file(tmp_path / 'rgba' / 'model.safetensors')
    monkeypatch.setattr(checkpoint, '_TIMM_ADAPTS_ANY_CHANNELS', False)
    with pytest.raises(CheckpointError, match=r'4-channel first convolution.*random weights.*Upgrade timm'):
        checkpoint_filter_fn(dict(state_dict), timm.create_model(f'local-dir:{tmp_path / "rgba"}'))
    monkeypatch.setattr(checkpoint, '_TIMM_ADAPTS_ANY_CHANNELS', True)
    assert checkpoint_filter_fn(dict(state_dict), model) is not None


# --- safety --------------------------------------------------------------------------------------------------------

@pytest.fixture
def no_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError('torch.load was called: something was unpickled')
    monkeypatch.setattr(torch, 'load', refuse)


@pytest.mark.parametrize('damage', ['truncated', 'header', 'garbage', 'empty'])
def test_corrupt_or_truncated_weights(exported, tmp_path, damage, no_unpickling):
    _, _, out = exported
    weights = out / 'model.safetensors'
    data = weights.read_bytes()
    weights.write_bytes({'truncated': data[:len(data) // 2], 'header': data[:20], 'garbage': b'\x00' * 64,
                         'empty': b''}[damage])
    with pytest.raises(CheckpointError, match='corrupt or truncated') as info:
        hub.create_model_checked(f'local-dir:{out}')
    assert str(weights) in str(info.value) and 'download it again' in str(info.value)


def test_corrupt_weights_from_cache(exported, tmp_path, offline, no_unpickling):
    _, _, out = exported
    weights = out / 'model.safetensors'
    weights.write_bytes(weights.read_bytes()[:-7])
    cache = tmp_path / 'hf_cache'
    _prime_cache(cache, REPO_ID, out)
    with pytest.raises(CheckpointError, match='force_download=True'):
        hub.create_model_checked(f'hf-hub:{REPO_ID}', cache_dir=cache)


def test_plain_timm_names_the_corrupt_file(exported, tmp_path, offline, no_unpickling):
    """timm's own loader says only 'Error while deserializing header': the model's builder names the file."""
    _, _, out = exported
    weights = out / 'model.safetensors'
    weights.write_bytes(weights.read_bytes()[:100])
    cache = tmp_path / 'hf_cache'
    _prime_cache(cache, REPO_ID, out)
    cached = cache / ('models--' + REPO_ID.replace('/', '--')) / 'snapshots' / COMMIT / 'model.safetensors'
    for name, where in [(f'local-dir:{out}', weights), (f'hf-hub:{REPO_ID}', cached)]:
        with pytest.raises(CheckpointError, match='corrupt or truncated') as info:
            timm.create_model(name, pretrained=True, cache_dir=cache)
        assert str(where) in str(info.value) and 'download it again' in str(info.value)
    with pytest.raises(CheckpointError, match=f'{weights}.* is corrupt or truncated'):
        timm.create_model('asge_cnn_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)))
    # A config naming a .bin file on the Hub: timm reads its safetensors alternative, which is the file named.
    with pytest.raises(CheckpointError, match='corrupt or truncated') as info:
        timm.create_model('asge_cnn_tiny', pretrained=True, cache_dir=cache,
                          pretrained_cfg_overlay=dict(hf_hub_id=REPO_ID, hf_hub_filename='pytorch_model.bin'))
    assert str(cached) in str(info.value)
    # A folder without model.safetensors: timm reads its first *.safetensors.
    renamed = weights.rename(out / 'ema.safetensors')
    with pytest.raises(CheckpointError, match=f'{renamed}.* is corrupt or truncated'):
        timm.create_model(f'local-dir:{out}', pretrained=True)


def test_pickled_weights_are_refused(exported, no_unpickling):
    model, _, out = exported
    (out / 'model.safetensors').unlink()
    (out / 'pytorch_model.bin').write_bytes(b'\x80\x04 not really a pickle')
    with pytest.raises(CheckpointError, match='pickle-based'):
        hub.create_model_checked(f'local-dir:{out}')
    with pytest.raises(CheckpointError, match='only .safetensors'):
        timm_asge.checkpoint.read_safetensors(out / 'pytorch_model.bin')


def test_export_refuses_corrupt_run(tmp_path):
    run = _make_run(tmp_path, _model())
    weights = run / 'export' / 'model.safetensors'
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match='corrupt or truncated'):
        hub.export(run, tmp_path / 'out')
    assert not (tmp_path / 'out').exists()
    assert hub.main(['export', str(run), str(tmp_path / 'out')]) == 2


@pytest.mark.parametrize(
    'arch,hint', [('asge_cnn_tny', "Did you mean 'asge_cnn_tiny'"), ('my_net', 'import timm_asge')])
def test_unknown_architecture(exported, arch, hint):
    _, _, out = exported
    config = json.loads((out / 'config.json').read_text())
    config['architecture'] = arch
    (out / 'config.json').write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=f'architecture {arch!r}, which is not registered') as info:
        hub.create_model_checked(f'local-dir:{out}')
    assert hint in str(info.value) and 'config.json' in str(info.value)
    with pytest.raises(CheckpointError, match='not registered'):
        hub.create_model_checked(f'{arch}.digits')


def test_broken_config_json(exported):
    _, _, out = exported
    (out / 'config.json').write_text('{"architecture": "asge_cnn_tiny", ')
    with pytest.raises(CheckpointError, match='not valid JSON'):
        hub.create_model_checked(f'local-dir:{out}')


def test_config_json_without_pretrained_cfg(exported):
    _, _, out = exported
    config = json.loads((out / 'config.json').read_text())
    del config['pretrained_cfg']
    (out / 'config.json').write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match='no "pretrained_cfg" entry'):
        hub.create_model_checked(f'local-dir:{out}')


def test_missing_hub_files_and_names(exported, tmp_path, offline, monkeypatch):
    """Offline, a repo or file missing from the cache is a CheckpointError naming it; so is an unknown tag."""
    _, _, out = exported
    cache = tmp_path / 'hf_cache'
    config_only = tmp_path / 'config_only'
    config_only.mkdir()
    shutil.copyfile(out / 'config.json', config_only / 'config.json')
    _prime_cache(cache, REPO_ID, config_only)
    with pytest.raises(CheckpointError, match=r'model.safetensors of timm-asge/asge_cnn_tiny.digits is not in the '
                                              r'local Hugging Face cache'):
        hub.create_model_checked(f'hf-hub:{REPO_ID}', cache_dir=cache)
    with pytest.raises(CheckpointError, match='config.json of timm-asge/elsewhere is not in the local'):
        hub.create_model_checked('hf-hub:timm-asge/elsewhere', cache_dir=cache)
    with pytest.raises(CheckpointError, match="'asge_cnn_tiny.digitz' has no published weights"):
        hub.create_model_checked('asge_cnn_tiny.digitz', cache_dir=cache)


def test_checked_local_dir_expands_home_and_refuses_features_only(exported, monkeypatch, x):
    model, _, out = exported
    monkeypatch.setenv('HOME', str(out.parent))
    with torch.no_grad():
        assert torch.equal(hub.create_model_checked(f'local-dir:~/{out.name}').eval()(x), model(x))
    with pytest.raises(ValueError, match='features_only=True'):
        hub.create_model_checked(f'local-dir:{out}', features_only=True)


def _edit_widths(out: Path) -> None:
    config = json.loads((out / 'config.json').read_text())
    config['model_args']['widths'] = [16, 64, 64, 128]
    (out / 'config.json').write_text(json.dumps(config))


def test_shape_mismatch(exported):
    _, _, out = exported
    _edit_widths(out)
    with pytest.raises(CheckpointError) as info:
        hub.create_model_checked(f'local-dir:{out}')
    message = str(info.value)
    assert 'stages.0.conv.weight: checkpoint (32, 1, 3, 3), model (16, 1, 3, 3)' in message
    assert 'describe different networks' in message and 'widths=[16, 64, 64, 128]' in message
    # Overriding an architecture option at load time is caught the same way.
    out2 = out.parent / 'again'
    shutil.copytree(out, out2)
    config = json.loads((out2 / 'config.json').read_text())
    config['model_args']['widths'] = [32, 64, 64, 128]
    (out2 / 'config.json').write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match='Only num_classes and in_chans may differ'):
        hub.create_model_checked(f'local-dir:{out2}', widths=(32, 64, 64, 64))


def test_checkpoint_filter_fn_allows_only_timm_adaptation(exported):
    model, _, out = exported
    state_dict = load_file(out / 'model.safetensors')
    adapted = timm.create_model(f'local-dir:{out}', num_classes=3, in_chans=2)
    assert checkpoint_filter_fn(dict(state_dict), adapted).keys() == state_dict.keys()
    broken = dict(state_dict, **{'stages.1.conv.bias': torch.zeros(7)})
    del broken['stages.2.conv.weight']
    broken['extra.weight'] = torch.zeros(1)
    with pytest.raises(CheckpointError) as info:
        checkpoint_filter_fn(broken, model)
    message = str(info.value)
    assert 'stages.1.conv.bias: checkpoint (7,), model (64,)' in message
    assert 'missing from checkpoint: stages.2.conv.weight' in message and 'not in the model: extra.weight' in message


def test_plain_timm_shape_mismatch_is_clear(exported):
    """timm's own loader runs our checkpoint_filter_fn (pretrained_filter_fn), so plain create_model is clear too."""
    _, _, out = exported
    _edit_widths(out)
    with pytest.raises(CheckpointError, match='describe different networks'):
        timm.create_model(f'local-dir:{out}', pretrained=True)


def test_export_refuses_registry_conflicts(tmp_path):
    # Weights trained with avg pooling, published as asge_cnn_tiny.digits (whose registry network uses rms):
    # a registry-name load would build the wrong network and silently give wrong logits.
    run = _make_run(tmp_path, _model(pool_type='avg'))
    with pytest.raises(hub.HubError, match="model_args.pool_type: exported 'avg', registry builds 'rms'"):
        hub.export(run, tmp_path / 'out')
    assert not (tmp_path / 'out').exists()
    out = hub.export(run, tmp_path / 'out', name='asge_cnn_tiny.digits_avg', repo_id='someone/digits-avg')
    assert json.loads((out / 'config.json').read_text())['model_args']['pool_type'] == 'avg'
    with pytest.raises(hub.HubError, match="config.json in .* is for architecture 'asge_cnn_tiny'"):
        hub.export(run, tmp_path / 'out3', name='asge_cnn.digits')


def test_export_never_deletes_other_files(exported, tmp_path, capsys):
    """The output folder is replaced whole: a folder holding anything but an earlier export is refused, untouched."""
    _, run, out = exported
    hub.export(run, out)  # an earlier export is replaced
    shared = tmp_path / 'hub'  # holds the export above: a parent folder given by mistake
    (shared / 'NOTES.md').write_text('mine')
    assert hub.main(['export', str(run), str(shared)]) == 2
    assert 'already holds NOTES.md, asge_cnn_tiny.digits, which writing this folder would delete' in \
        capsys.readouterr().err
    assert (shared / 'NOTES.md').read_text() == 'mine' and (out / 'model.safetensors').is_file()
    with pytest.raises(hub.HubError, match='already holds README.md'):  # save_pretrained writes no card
        hub.save_pretrained(_model(), out)
    (tmp_path / 'file').write_text('x')
    with pytest.raises(hub.HubError, match='is a file, not a folder'):
        hub.export(run, tmp_path / 'file')
    # A folder that cannot be made (under a file here; read-only or missing mounts alike) says so, naming the path.
    with pytest.raises(hub.HubError, match=r'cannot create a folder at .*file/out \(.*\); pass a writable path'):
        hub.export(run, tmp_path / 'file' / 'out')
    with pytest.raises(hub.HubError, match='cannot create a folder at'):
        hub.save_pretrained(_model(), tmp_path / 'file' / 'model')


def test_writes_keep_permissions(exported, tmp_path):
    """Atomic writes go through a temporary file: it must not narrow the permissions of what it replaces."""
    import os

    _, run, out = exported
    umask = os.umask(0o022)
    try:
        readme = tmp_path / 'README.md'
        readme.write_text('<!-- section: pretrained (owner: hub) -->\nold\n')
        readme.chmod(0o664)
        assert hub.update_readme(readme)
        assert readme.stat().st_mode & 0o777 == 0o664
        fresh = hub.export(run, tmp_path / 'fresh')
        assert fresh.stat().st_mode & 0o777 == 0o755
        assert (fresh / 'config.json').stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(umask)


def test_results_json_is_checked(tmp_path):
    run = _make_run(tmp_path, _model())
    results = json.loads((run / 'results.json').read_text())
    results['test_accuracy']['fusion'] = 96.1  # a percentage where a fraction belongs
    (run / 'results.json').write_text(json.dumps(results))
    with pytest.raises(hub.HubError, match=r"test_accuracy\['fusion'\] = 96.1 is not a fraction"):
        hub.export(run, tmp_path / 'out')
    with pytest.raises(hub.HubError, match='no results.json'):
        hub.export(tmp_path / 'nowhere', tmp_path / 'out')


# --- hub_cards and the README table --------------------------------------------------------------------------------

PAPER_ACCURACY = {'asge_cnn.mnist': 99.65, 'asge_cnn.fashion_mnist': 93.41, 'asge_cnn.cifar10': 90.62,
                  'asge_vgg11.cifar100': 65.42, 'asge_cnn_tiny.digits': None}


def test_hub_cards_metadata():
    files = sorted(CARDS.glob('*.yaml'))
    assert {p.stem for p in files} == set(PAPER_ACCURACY)
    for path in files:
        meta = hub.load_metadata(path)
        assert meta['name'] == path.stem
        assert timm.models.get_pretrained_cfg(meta['name']).hf_hub_id == meta['repo_id']
        assert meta['paper']['accuracy'] == PAPER_ACCURACY[meta['name']]
        assert (ROOT / meta['config_file']).is_file()
        assert meta['license'] == timm.models.get_pretrained_cfg(meta['name']).license
        if meta['results']:  # recorded from a real run: must be a complete results record
            hub._check_results(meta['results'], str(path))
            assert meta['results']['model'] == meta['name'].split('.')[0]


@pytest.mark.parametrize('edit,message', [
    (dict(published=True, repo_id=None), 'published: true needs the repo_id'),
    (dict(paper={'accuracy': '99.1'}), 'paper.accuracy must be a number'),
    (dict(dataset='mnist'), 'dataset must be a mapping'),
])
def test_bad_card_metadata_is_a_clear_error(tmp_path, capsys, edit, message):
    path = _metadata(tmp_path)
    meta = yaml.safe_load(path.read_text())
    meta.update(edit)
    path.write_text(yaml.safe_dump(meta))
    with pytest.raises(hub.HubError, match=message):
        hub.load_metadata(path)
    assert hub.main(['table', '--cards', str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_pretrained_table_and_readme_update(tmp_path):
    cards = tmp_path / 'cards'
    cards.mkdir()
    for name in ('template.md', 'readme_section.md', 'asge_cnn.mnist.yaml', 'asge_cnn_tiny.digits.yaml'):
        shutil.copyfile(CARDS / name, cards / name)
    meta = yaml.safe_load((cards / 'asge_cnn_tiny.digits.yaml').read_text())
    meta['results'] = {'model': 'asge_cnn_tiny', 'dataset': {'name': 'digits'}, 'test_accuracy': ACCURACY}
    (cards / 'asge_cnn_tiny.digits.yaml').write_text(yaml.safe_dump(meta))

    table = hub.pretrained_table(cards)
    assert table.startswith('## Pretrained models')
    assert '| `asge_cnn.mnist` | MNIST | - | - | - | 99.65 | `recipes/configs/mnist.yaml` | not yet trained |' in table
    assert '| 96.11 | 95.00 | 95.28 | - |' in table and 'trained, not yet on the Hub' in table
    assert "local-dir:outputs/hub/asge_cnn_tiny.digits" in table

    readme = tmp_path / 'README.md'
    readme.write_text('# x\n\n<!-- section: intro (owner: lead) -->\nintro\n\n'
                      '<!-- section: pretrained (owner: hub) -->\nold table\n\n'
                      '<!-- section: publish (owner: hub) -->\npublish text\n')
    assert hub.main(['table', '--cards', str(cards), '--write', str(readme)]) == 0
    text = readme.read_text()
    assert 'old table' not in text and table in text
    assert text.startswith('# x\n\n<!-- section: intro (owner: lead) -->\nintro\n')
    assert text.endswith('<!-- section: publish (owner: hub) -->\npublish text\n')
    assert hub.update_readme(readme, cards) is False  # idempotent


def test_repo_readme_table_is_current():
    text = (ROOT / 'README.md').read_text()
    assert hub.pretrained_table() in text, 'README.md is stale: run python -m timm_asge.hub table --write README.md'
    assert '<!-- section: publish (owner: hub) -->\n## Publish your own' in text


# --- the README's main job (digits), once it has run ---------------------------------------------------------------

DIGITS_RUN = ROOT / 'outputs' / 'digits'


@pytest.mark.skipif(not (DIGITS_RUN / 'results.json').is_file(), reason='the digits job has not run (outputs/digits)')
@torch.no_grad()
def test_digits_run_exports_with_matching_card(tmp_path):
    results = json.loads((DIGITS_RUN / 'results.json').read_text())
    out = hub.export(DIGITS_RUN, tmp_path / 'asge_cnn_tiny.digits', metadata=_metadata(tmp_path))
    card = ModelCard.load(out / 'README.md')
    measured = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert measured == {f'Top-1 accuracy ({k})': v for k, v in results['test_accuracy'].items()}
    for strategy, value in results['test_accuracy'].items():
        assert f'| `{strategy}` | {100 * value:.2f} |' in card.text
    x = torch.rand(2, 1, 16, 16)
    original = timm.create_model(f'local-dir:{DIGITS_RUN / "export"}', pretrained=True).eval()
    loaded = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    assert torch.equal(loaded(x), original(x))
    recorded = hub.load_metadata(CARDS / 'asge_cnn_tiny.digits.yaml')['results']
    if recorded:  # what the README table shows is this run's numbers
        assert recorded['test_accuracy'] == results['test_accuracy']


def test_export_refuses_data_config_for_other_channels(tmp_path):
    # A 3-value mean on a 1-channel model would make timm's transforms broadcast grey images to 3 channels.
    run = _make_run(tmp_path, _model())
    config = json.loads((run / 'export' / 'config.json').read_text())
    config['pretrained_cfg'].update(mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])
    (run / 'export' / 'config.json').write_text(json.dumps(config))
    with pytest.raises(hub.HubError, match=r'reads 1-channel images but its pretrained_cfg has mean \[0.0, 0.0, 0.0\]'):
        hub.export(run, tmp_path / 'out', name='asge_cnn_tiny.grey', check_registry=False)
