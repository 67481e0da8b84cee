"""Training takes K and the token grid from the manifest beside each source's shards (data.manifest optional)."""
import pytest

from vqd_scale.families import load_config
from vqd_scale.data.random_shards import write_random_token_shards
from vqd_scale.families import get

resolve_data_dependent = get("vqd").resolve  # the family's data-dependent settings, as vqd-train applies them

BASE = ["task=vqd", "model.size=debug", "model.num_classes=0", "model.height=4", "model.width=4"]


def cfg(tmp_path, *sources, extra=()):
    srcs = ", ".join(f'{{name: {n}, shards: "{tmp_path}/{n}/{{00000..00001}}.tar"}}' for n in sources)
    return load_config(None, BASE + [f"data.sources=[{srcs}]", *extra])


def test_k_and_grid_from_the_sources_manifests(tmp_path):
    for name in ("laion", "cc"):
        write_random_token_shards(tmp_path / name, 2, 3, (4, 4), num_classes=37, tokenizer_id="vq-0123456789ab")
    out = resolve_data_dependent(cfg(tmp_path, "laion", "cc"))  # data.manifest unset, as the docs allow
    assert out.model.num_classes == 37
    with pytest.raises(ValueError, match="set model.height=8"):  # the grid is checked against the manifests too
        write_random_token_shards(tmp_path / "big", 2, 3, (8, 8), num_classes=37, tokenizer_id="vq-0123456789ab")
        resolve_data_dependent(cfg(tmp_path, "big"))
    with pytest.raises(ValueError, match="data.tokenizer_id"):
        resolve_data_dependent(cfg(tmp_path, "laion", extra=["data.tokenizer_id=vq-ffffffffffff"]))


def test_sources_that_disagree_are_refused_by_name(tmp_path):
    write_random_token_shards(tmp_path / "laion", 2, 3, (4, 4), num_classes=37, tokenizer_id="vq-0123456789ab")
    write_random_token_shards(tmp_path / "cc", 2, 3, (4, 4), num_classes=40, tokenizer_id="vq-0123456789ab")
    with pytest.raises(ValueError, match=r"data source 'cc' .* num_classes=40 but source 'laion'"):
        resolve_data_dependent(cfg(tmp_path, "laion", "cc"))
    write_random_token_shards(tmp_path / "cc", 2, 3, (4, 4), num_classes=37, tokenizer_id="vq-ffffffffffff")
    with pytest.raises(ValueError, match=r"data source 'cc' .* tokenizer_id=vq-ffffffffffff"):
        resolve_data_dependent(cfg(tmp_path, "laion", "cc"))


def test_data_manifest_only_where_a_source_has_none(tmp_path):
    write_random_token_shards(tmp_path / "laion", 2, 3, (4, 4), num_classes=37)
    write_random_token_shards(tmp_path / "other", 1, 1, (4, 4), num_classes=99)
    (tmp_path / "laion" / "manifest.json").rename(tmp_path / "laion.json")
    with pytest.raises(FileNotFoundError, match="vqd-extract"):  # no manifest anywhere: say what to run
        resolve_data_dependent(cfg(tmp_path, "laion"))
    assert resolve_data_dependent(cfg(tmp_path, "laion", extra=[f"data.manifest={tmp_path}/laion.json"])
                                  ).model.num_classes == 37
    (tmp_path / "laion.json").rename(tmp_path / "laion" / "manifest.json")  # the source's own wins
    assert resolve_data_dependent(cfg(tmp_path, "laion", extra=[f"data.manifest={tmp_path}/other/manifest.json"])
                                  ).model.num_classes == 37

