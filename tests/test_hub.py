"""Hub export, card, push and checked loading, all offline: local folders, a primed Hugging Face cache with
HF_HUB_OFFLINE, and a fake HfApi receiving pushes."""
import copy
import json
import shutil
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
from timm_asge.hub import CheckpointError

CARDS = Path(__file__).resolve().parent.parent / 'hub_cards'
REPO_ID = 'timm-asge/asge_cnn_tiny.digits'
LABELS = [str(i) for i in range(10)]
ACCURACY = {'fusion': 0.9611, 'last': 0.95, 'best': 0.9527}
BLOCK_ACCURACY = [0.5, 0.75, 0.9527, 0.95]
COMMIT = '0123456789abcdef0123456789abcdef01234567'


def _model(**kwargs):
    torch.manual_seed(0)
    return timm.create_model('asge_cnn_tiny', **kwargs).eval()


def _make_run(root: Path, model) -> Path:
    """A training output folder as recipes/train.py writes it: export/ and results.json."""
    run = root / 'run'
    hub.save_pretrained(model, run / 'export', label_names=LABELS)
    args = model.architecture_args()
    results = {
        'model': 'asge_cnn_tiny',
        'dataset': {'name': 'digits', 'hub_id': None, 'splits': {'train': 1293, 'validation': 144, 'test': 360}},
        'config_file': 'recipes/configs/digits.yaml',
        'command': 'accelerate launch recipes/train.py --config recipes/configs/digits.yaml',
        'epochs': 40, 'best_epoch': 37, 'train_time_s': 61.25, 'recipe': {'train': {'epochs': 40}},
        'prediction': args['prediction'], 'best_block': None if args['best_block'] is None else args['best_block'] + 1,
        'test_accuracy': ACCURACY, 'test_block_accuracy': BLOCK_ACCURACY,
        'strategies': {k: {'test_accuracy': v, 'params': 123_456, 'flops': 4_567_890, 'activation_bytes': 3 << 20}
                       for k, v in ACCURACY.items()},
    }
    (run / 'results.json').write_text(json.dumps(results))
    return run


def _prime_cache(cache: Path, repo_id: str, folder: Path, commit: str = COMMIT) -> Path:
    """Lay ``folder`` out as huggingface_hub's cache holds a downloaded snapshot; returns the snapshot folder."""
    repo = cache / ('models--' + repo_id.replace('/', '--'))
    (repo / 'refs').mkdir(parents=True, exist_ok=True)
    (repo / 'refs' / 'main').write_text(commit)
    snapshot = repo / 'snapshots' / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        shutil.copyfile(f, snapshot / f.name)
    return snapshot


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / 'config.json').read_text())
    for key, value in changes.items():
        *parents, last = key.split('.')
        node = config
        for p in parents:
            node = node[p]
        node[last] = value
    (folder / 'config.json').write_text(json.dumps(config))


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')


@pytest.fixture
def no_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError('torch.load was called: something was unpickled')
    monkeypatch.setattr(torch, 'load', refuse)


@pytest.fixture
def x():
    return torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def exported(tmp_path):
    """(model, run folder, exported Hub folder) of a `best`-strategy model."""
    model = _model(prediction='best', best_block=2)
    run = _make_run(tmp_path, model)
    out = hub.export(run, tmp_path / 'hub' / 'asge_cnn_tiny.digits', metadata=CARDS / 'asge_cnn_tiny.digits.yaml')
    return model, run, out


class FakeHfApi:
    """Stands in for huggingface_hub.HfApi: records calls and 'uploads' into a huggingface_hub cache layout."""
    instances = []
    cache: Path = None

    def __init__(self, token=None, library_name=None, **kwargs):
        self.token, self.library_name, self.calls = token, library_name, []
        FakeHfApi.instances.append(self)

    def create_repo(self, repo_id, private=False, exist_ok=False, **kwargs):
        self.calls.append(('create_repo', repo_id))
        return huggingface_hub.RepoUrl(f'https://huggingface.co/{repo_id}')

    def upload_folder(self, repo_id, folder_path, allow_patterns=None, **kwargs):
        files = sorted(p.name for p in Path(folder_path).iterdir() if p.name in allow_patterns)
        self.calls.append(('upload_folder', repo_id, files))
        staged = Path(folder_path).parent / '.staged'
        staged.mkdir()
        for name in files:
            shutil.copyfile(Path(folder_path) / name, staged / name)
        _prime_cache(FakeHfApi.cache, repo_id, staged, commit='f' * 40)


@pytest.fixture
def fake_api(monkeypatch, tmp_path):
    FakeHfApi.instances = []
    FakeHfApi.cache = tmp_path / 'hf_cache'
    monkeypatch.setattr(hub, 'HfApi', FakeHfApi)
    return FakeHfApi


# --- export, card, plain timm loading --------------------------------------------------------------------------------

@pytest.mark.parametrize('prediction,best_block', [('fusion', None), ('best', 2), ('last', None)])
@torch.no_grad()
def test_export_loads_in_plain_timm_with_the_same_logits(tmp_path, x, prediction, best_block):
    model = _model(prediction=prediction, best_block=best_block)
    out = hub.export(_make_run(tmp_path, model), tmp_path / 'out')

    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    loaded = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    assert loaded.architecture_args() == model.architecture_args()
    assert torch.equal(loaded(x), model(x))
    config = json.loads((out / 'config.json').read_text())
    assert config['model_args']['prediction'] == prediction and config['model_args']['best_block'] == best_block
    assert config['label_names'] == LABELS and config['pretrained_cfg']['tag'] == 'digits'
    assert not {'file', 'hf_hub_id', 'source'} & set(config['pretrained_cfg'])
    weights = load_file(out / 'model.safetensors')
    for i, block in enumerate(model.stages):  # the fixed projections travel with the weights
        assert torch.equal(weights[f'stages.{i}.proj.weight'], block.proj.weight)


def test_card_has_model_index_results_costs_and_block_accuracy(exported):
    _, _, out = exported
    card = ModelCard.load(out / 'README.md')
    assert card.data.library_name == 'timm' and card.data.license == 'apache-2.0'
    results = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert results == {f'Top-1 accuracy ({k})': v for k, v in ACCURACY.items()}
    assert {r.dataset_split for r in card.data.eval_results} == {'test'}
    assert f"timm.create_model('hf-hub:{REPO_ID}', pretrained=True)" in card.text
    assert '| `best` | 95.27 | 123.46 k | 4.57 M | 3.00 MiB |' in card.text
    assert '| Accuracy | 50.00 | 75.00 | 95.27 | 95.00 |' in card.text
    assert 'reads block 3' in card.text and 'scikit-learn digits' in card.text  # the results and the metadata


def test_save_pretrained_of_a_channels_last_model(tmp_path):
    model = _model().to(memory_format=torch.channels_last)
    hub.save_pretrained(model, tmp_path / 'export')
    loaded = hub.create_model_checked(f'local-dir:{tmp_path / "export"}').state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


def test_export_replaces_only_an_earlier_export(exported, tmp_path):
    _, run, out = exported
    hub.export(run, out)  # over an earlier export: fine
    shared = tmp_path / 'shared'
    shared.mkdir()
    (shared / 'notes.txt').write_text('mine')
    with pytest.raises(FileExistsError, match='notes.txt'):
        hub.export(run, shared)
    assert [p.name for p in shared.iterdir()] == ['notes.txt']


def test_export_input_errors(tmp_path):
    model = _model(pool_type='avg')
    run = _make_run(tmp_path, model)
    with pytest.raises(ValueError, match='asge_cnn_small'):
        hub.export(run, tmp_path / 'out', name='asge_cnn_small.digits')
    hub.export(run, tmp_path / 'out', name='asge_cnn_tiny.digits_avg')  # a tag of its own
    (run / 'results.json').unlink()
    with pytest.raises(ValueError, match='results.json'):
        hub.export(run, tmp_path / 'out2')
    assert hub.main(['export', str(run), str(tmp_path / 'out2')]) == 2
    assert not (tmp_path / 'out2').exists()


def test_card_metadata_files_name_registered_architectures():
    for path in CARDS.glob('*.yaml'):
        meta = yaml.safe_load(path.read_text())
        assert meta['name'] == path.stem and meta['repo_id'].endswith('/' + path.stem)
        assert timm.is_model(path.stem.split('.')[0])


@torch.no_grad()
def test_other_class_and_channel_counts_adapt_as_in_timm(exported, x):
    model, _, out = exported
    five = hub.create_model_checked(f'local-dir:{out}', num_classes=5)
    assert five.num_classes == 5 and five.eval()(x).shape == (4, 5)
    assert torch.equal(five.stages[1].conv.weight, model.stages[1].conv.weight)
    rgb = hub.create_model_checked(f'local-dir:{out}', in_chans=3).eval()
    assert torch.allclose(rgb(x.expand(-1, 3, -1, -1)), model(x), atol=1e-5)  # grey RGB: the same network


# --- Hub loading from a primed cache, push ---------------------------------------------------------------------------

@torch.no_grad()
def test_hf_hub_from_primed_cache_offline(exported, tmp_path, x, offline):
    model, _, out = exported
    cache = tmp_path / 'hf_cache'
    _prime_cache(cache, REPO_ID, out)
    assert torch.equal(timm.create_model(f'hf-hub:{REPO_ID}', pretrained=True, cache_dir=cache).eval()(x), model(x))
    assert torch.equal(hub.create_model_checked(f'hf-hub:{REPO_ID}', cache_dir=cache).eval()(x), model(x))
    with pytest.raises(CheckpointError, match='timm-asge/elsewhere.*local-dir'):
        hub.create_model_checked('hf-hub:timm-asge/elsewhere', cache_dir=cache)


@torch.no_grad()
def test_unpublished_registry_name_is_refused():
    with pytest.raises(CheckpointError, match='list_models'):
        hub.create_model_checked('asge_cnn_tiny.unpublished')


@torch.no_grad()
def test_push_uploads_the_export_and_it_loads_from_the_hub(exported, tmp_path, x, fake_api, offline):
    model, run, _ = exported
    repo_id = 'someone/asge-digits'
    out = hub.export(run, tmp_path / 'mine', repo_id=repo_id)
    (out / 'pytorch_model.bin').write_bytes(b'a pickle')  # never uploaded

    assert hub.push(out, repo_id, token='hf_x') == ['config.json', 'model.safetensors', 'README.md']
    api, = fake_api.instances
    assert api.token == 'hf_x' and api.library_name == 'timm'
    assert api.calls == [('create_repo', repo_id), ('upload_folder', repo_id, ['README.md', 'config.json',
                                                                               'model.safetensors'])]
    loaded = timm.create_model(f'hf-hub:{repo_id}', pretrained=True, cache_dir=fake_api.cache).eval()
    assert torch.equal(loaded(x), model(x))


def test_push_dry_run_lists_the_files_and_uploads_nothing(exported, fake_api, capsys):
    _, _, out = exported
    assert hub.push(out, REPO_ID, dry_run=True) == ['config.json', 'model.safetensors', 'README.md']
    assert hub.main(['push', str(out), '--repo-id', REPO_ID, '--dry-run']) == 0
    printed = capsys.readouterr().out
    assert 'nothing uploaded' in printed and 'model.safetensors' in printed
    assert fake_api.instances == []


def test_push_refuses_a_card_for_another_repo_and_bad_weights(exported, fake_api):
    _, _, out = exported
    with pytest.raises(ValueError, match='--repo-id someone/else'):
        hub.push(out, 'someone/else', dry_run=True)
    (out / 'model.safetensors').write_bytes(b'\x00' * 16)
    with pytest.raises(CheckpointError, match='model.safetensors'):
        hub.push(out, REPO_ID)
    assert fake_api.instances == []


# --- checked loading: clear errors naming the file -------------------------------------------------------------------

@pytest.mark.parametrize('damage', ['truncated', 'header', 'garbage', 'empty'])
def test_corrupt_or_truncated_weights(exported, damage, no_unpickling):
    _, _, out = exported
    weights = out / 'model.safetensors'
    data = weights.read_bytes()
    weights.write_bytes({'truncated': data[:-7], 'header': data[:20], 'garbage': b'\x07' * 64, 'empty': b''}[damage])
    with pytest.raises(CheckpointError, match='corrupt or truncated') as info:
        hub.create_model_checked(f'local-dir:{out}')
    assert str(weights) in str(info.value)


def test_corrupt_weights_in_the_hub_cache(exported, tmp_path, offline, no_unpickling):
    _, _, out = exported
    cache = tmp_path / 'hf_cache'
    snapshot = _prime_cache(cache, REPO_ID, out)
    (snapshot / 'model.safetensors').write_bytes(b'\x00' * 16)
    with pytest.raises(CheckpointError, match='corrupt or truncated') as info:
        hub.create_model_checked(f'hf-hub:{REPO_ID}', cache_dir=cache)
    assert str(snapshot / 'model.safetensors') in str(info.value)


def test_pickled_weights_are_never_read(exported, no_unpickling):
    _, _, out = exported
    (out / 'model.safetensors').rename(out / 'pytorch_model.bin')
    with pytest.raises(CheckpointError, match='safetensors') as info:
        hub.create_model_checked(f'local-dir:{out}')
    assert str(out / 'model.safetensors') in str(info.value)


@pytest.mark.parametrize('arch,fact', [('resnet18', 'asge_'), ('asge_cnn_huge', 'upgrade'), (7, 'asge_')])
def test_foreign_or_unknown_architecture(exported, arch, fact):
    _, _, out = exported
    _edit_config(out, architecture=arch)
    with pytest.raises(CheckpointError, match=fact) as info:
        hub.create_model_checked(f'local-dir:{out}')
    assert str(out / 'config.json') in str(info.value) and repr(arch) in str(info.value)


@pytest.mark.parametrize('text', ['{"architecture": "asge_cnn_tiny", ', '[]', '{"architecture": "asge_cnn_tiny"}'])
def test_broken_config(exported, text):
    _, _, out = exported
    (out / 'config.json').write_text(text)
    with pytest.raises(CheckpointError, match='not a timm config') as info:
        hub.create_model_checked(f'local-dir:{out}')
    assert str(out / 'config.json') in str(info.value)
    shutil.rmtree(out)
    with pytest.raises(CheckpointError, match='no config.json'):
        hub.create_model_checked(f'local-dir:{out}')


def test_weights_that_do_not_fit_the_config(exported):
    _, _, out = exported
    (out / 'README.md').unlink()  # a folder without our card: no recorded hashes
    _edit_config(out, **{'model_args.widths': [16, 64, 64, 128]})
    with pytest.raises(CheckpointError, match='stages.0.conv.weight') as info:
        hub.create_model_checked(f'local-dir:{out}')
    assert str(out / 'model.safetensors') in str(info.value)


def test_local_dir_expands_home_and_refuses_features_only(exported, monkeypatch, x):
    model, _, out = exported
    monkeypatch.setenv('HOME', str(out.parent))
    with torch.no_grad():
        assert torch.equal(hub.create_model_checked(f'local-dir:~/{out.name}').eval()(x), model(x))
    with pytest.raises(ValueError, match='forward_intermediates'):
        hub.create_model_checked(f'local-dir:{out}', features_only=True)


@pytest.mark.parametrize('name, edit', [
    ('config.json', lambda out: _edit_config(out, **{'model_args.pool_type': 'avg'})),  # loads, and costs accuracy
    ('model.safetensors', lambda out: (out / 'model.safetensors').write_bytes(
        _flip_last_weight_bit((out / 'model.safetensors').read_bytes()))),
])
def test_files_changed_since_export_are_refused(exported, name, edit):
    _, _, out = exported
    edit(out)
    with pytest.raises(CheckpointError, match=rf'{name} .*SHA-256 differs'):
        hub.create_model_checked(f'local-dir:{out}')


def test_a_saved_folder_without_a_card_still_checks_its_weights(tmp_path):
    hub.save_pretrained(_model(), tmp_path / 'run_export')  # what a training run writes: no model card
    weights = tmp_path / 'run_export' / 'model.safetensors'
    weights.write_bytes(_flip_last_weight_bit(weights.read_bytes()))
    with pytest.raises(CheckpointError, match=r'model.safetensors is not the file saved with .*config.json'):
        hub.create_model_checked(f'local-dir:{tmp_path / "run_export"}')


def _flip_last_weight_bit(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])  # the last tensor's last byte: still a valid file


def test_non_finite_weights_are_refused(exported):
    model, _, out = exported
    (out / 'README.md').unlink()
    poisoned = copy.deepcopy(model)
    with torch.no_grad():
        poisoned.stages[1].conv.weight[0, 0, 0, 0] = float('nan')
    hub.save_pretrained(poisoned, out)
    with pytest.raises(CheckpointError, match=r'NaN or infinite values in stages\.1\.conv\.weight'):
        hub.create_model_checked(f'local-dir:{out}')


@pytest.mark.parametrize('change, fact', [
    ({'model_args.alpha': 7}, 'numbers'),  # grids of 2M cells a block: hundreds of GB of projections
    ({'model_args.widths': [4096] * 64, 'model_args.downsample': [False] * 64}, 'numbers'),
    ({'model_args.surprise': 1}, 'surprise'),
    ({'model_args.best_block': 17}, 'best_block=17'),
])
def test_hostile_configs_are_refused_before_allocating(exported, change, fact):
    _, _, out = exported
    (out / 'README.md').unlink()
    _edit_config(out, **change)
    with pytest.raises(CheckpointError, match=fact) as info:
        hub.create_model_checked(f'local-dir:{out}')
    assert str(out / 'config.json') in str(info.value)
