"""The item_dropout / history_dropout config keys reach the expert options and are validated."""

import pytest

from persrec.config import Config, ConfigError
from persrec.train.build import build_model


@pytest.mark.parametrize("key", ["item_dropout", "history_dropout"])
def test_build_model_validates_and_wires_both_options(key):
    common = dict(
        model="PersonalizedHSTU",
        MAX_ITEM_LIST_LENGTH=8,
        number_of_user_tokens=2,
        pretrain_item_num=5,
        recent_item_num=3,
        item_embedding_size=8,
    )
    model = build_model(Config(**common, **{key: 0.25}), num_items=20)
    assert getattr(model.options, key) == 0.25
    other = "history_dropout" if key == "item_dropout" else "item_dropout"
    assert getattr(model.options, other) == 0.0
    for bad in (1.0, -0.1):
        with pytest.raises(ConfigError, match=key):
            build_model(Config(**common, **{key: bad}), num_items=20)
