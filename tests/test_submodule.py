"""The recurrent core of a larger model: capture what it receives, analyse it on exactly that."""

import logging

import numpy as np
import pytest
import torch
from torch import nn

import rnnjac
from rnnjac._submodule import capture, describe_ignored, ignored_weights, recurrent_submodules, resolve


def _gen():
    return torch.Generator().manual_seed(0)


def _assert_same_spectra(a, b):
    """Every variable and coordinate identical (attrs such as created_at aside)."""
    assert set(a.data_vars) == set(b.data_vars)
    for name in a.data_vars:
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)
    assert a.sizes == b.sizes


class EncoderGRU(nn.Module):
    def __init__(self, p_drop=0.0):
        super().__init__()
        torch.manual_seed(1)
        self.encoder = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Dropout(p_drop))
        self.gru = nn.GRU(4, 8, batch_first=True)
        self.readout = nn.Linear(8, 2)

    def forward(self, x):
        return self.readout(self.gru(self.encoder(x))[0])


class LitLSTM(nn.Module):
    """LightningModule-like: batch-first inputs, a sequence-first LSTM core with a learned initial state."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.embed = nn.Linear(3, 4)
        self.core = nn.LSTM(4, 6)
        self.h0 = nn.Parameter(torch.randn(1, 1, 6) * 0.3)
        self.c0 = nn.Parameter(torch.randn(1, 1, 6) * 0.3)
        self.head = nn.Linear(6, 1)

    def forward(self, x):  # x: (B, T, 3)
        b = x.shape[0]
        z = self.embed(x).transpose(0, 1)  # (T, B, 4)
        out, _ = self.core(z, (self.h0.expand(1, b, 6).contiguous(), self.c0.expand(1, b, 6).contiguous()))
        return self.head(out[-1])

    def training_step(self, batch, batch_idx):
        x, y = batch
        return ((self(x) - y) ** 2).mean()


class Unpack(nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.lstm = rnn

    def forward(self, x):
        return self.lstm(x)[0]


class Wrapper(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def _nested():
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Linear(3, 5),
        Wrapper(nn.Sequential(Unpack(nn.LSTM(5, 4, num_layers=2, batch_first=True)))),
        nn.Linear(4, 1),
    )


def test_encoder_gru_readout_equals_hand_written():
    m, x = EncoderGRU(), torch.randn(3, 30, 5)
    c = capture(m, x)
    assert (c.name, c.module, c.batch_first, c.h0, c.calls) == ("gru", m.gru, True, None, 1)
    with torch.no_grad():
        hand = m.encoder(x)
    assert torch.equal(c.inputs, hand)
    got = rnnjac.spectra(c.module, c.inputs_batch_first, c.h0, k=3, generator=_gen())
    want = rnnjac.spectra(m.gru, hand, k=3, generator=_gen())
    _assert_same_spectra(got, want)


def test_lightning_like_lstm_core_with_learned_h0():
    m, x = LitLSTM(), torch.randn(2, 25, 3)
    c = capture(m, x, "core")
    assert not c.batch_first and c.inputs.shape == (25, 2, 4)
    with torch.no_grad():
        hand = m.embed(x)  # batch-first, as rnnjac takes it
        h0 = (m.h0.expand(1, 2, 6), m.c0.expand(1, 2, 6))
    assert torch.equal(c.inputs_batch_first, hand)
    assert all(torch.equal(a, b) for a, b in zip(c.h0, h0, strict=True))
    got = rnnjac.spectra(c.module, c.inputs_batch_first, c.h0, batch_first=True, k=4, generator=_gen())
    want = rnnjac.spectra(m.core, hand.transpose(0, 1), h0, k=4, generator=_gen())
    _assert_same_spectra(got, want)
    # the captured layout fed as is (the module's own flag) gives the same
    _assert_same_spectra(rnnjac.spectra(c.module, c.inputs, c.h0, k=4, generator=_gen()), want)


@pytest.mark.parametrize("by", ["name", "object", "auto"])
def test_two_layer_lstm_in_nested_wrappers(by):
    m, x = _nested(), torch.randn(2, 20, 3)
    lstm = m[1].inner[0].lstm
    submodule = {"name": "1.inner.0.lstm", "object": lstm, "auto": None}[by]
    c = capture(m, x, submodule)
    assert c.name == "1.inner.0.lstm" and c.module is lstm
    with torch.no_grad():
        hand = m[0](x)
    got = rnnjac.spectra(c.module, c.inputs_batch_first, c.h0, k=5, eigenvalues=True, generator=_gen())
    want = rnnjac.spectra(lstm, hand, k=5, eigenvalues=True, generator=_gen())
    _assert_same_spectra(got, want)


def test_two_recurrent_submodules_need_a_name():
    class Seq2Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.dec = nn.GRU(3, 4, batch_first=True), nn.LSTM(4, 4, batch_first=True)

        def forward(self, x):
            return self.dec(self.enc(x)[0])[0]

    m, x = Seq2Seq(), torch.randn(2, 10, 3)
    with pytest.raises(ValueError, match=r"2 recurrent submodules: 'enc' \(GRU\), 'dec' \(LSTM\); pass submodule="):
        capture(m, x)
    c = capture(m, x, submodule="dec")
    with torch.no_grad():
        assert torch.equal(c.inputs, m.enc(x)[0])


def test_bad_submodule_names():
    m, x = EncoderGRU(), torch.randn(2, 5, 5)
    with pytest.raises(ValueError, match=r"submodule='rnn' is not in EncoderGRU; its recurrent submodules: 'gru'"):
        capture(m, x, "rnn")
    with pytest.raises(ValueError, match=r"submodule='readout' is a Linear, not an nn.RNN"):
        capture(m, x, "readout")
    with pytest.raises(ValueError, match="is not a submodule of EncoderGRU"):
        capture(m, x, nn.GRU(4, 8))
    with pytest.raises(ValueError, match="holds no nn.RNN"):
        capture(nn.Linear(5, 2), x)
    with pytest.raises(TypeError, match="dotted name"):
        capture(m, x, 3)


def test_batch_first_tensor_into_sequence_first_module_is_not_swapped():
    # the model hands its (B, T, I) tensor to a batch_first=False GRU, which reads it as (T'=B, B'=T, I):
    # the analysis must follow what the GRU computed, not the user's idea of the layout
    class Careless(nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = nn.GRU(3, 5)

        def forward(self, x):
            return self.gru(x)[0]

    m, x = Careless(), torch.randn(4, 9, 3)  # meant as B=4, T=9
    c = capture(m, x)
    assert not c.batch_first and torch.equal(c.inputs, x)
    assert c.inputs_batch_first.shape == (9, 4, 3)  # the GRU's own batch of 9 sequences of 4 steps
    states = rnnjac.trajectory(c.module, c.inputs_batch_first, batch_first=True)
    with torch.no_grad():
        out = m(x)  # (T'=4, B'=9, 5)
    torch.testing.assert_close(states[:, 1:], out.transpose(0, 1), rtol=1e-5, atol=1e-6)
    module, xs, h0, bf, attrs = resolve(m, x)
    assert (module, bf, attrs) == (m.gru, True, {"submodule": "gru"}) and xs.shape == (9, 4, 3)
    with pytest.raises(ValueError, match="leave batch_first=None"):
        resolve(m, x, batch_first=True)


def test_capture_uses_eval_mode_and_restores_modes():
    m, x = EncoderGRU(p_drop=0.5), torch.randn(2, 12, 5)
    m.train()
    m.readout.eval()  # a mixed state must come back exactly
    c = capture(m, x)
    modes = {name: mod.training for name, mod in m.named_modules()}
    assert modes.pop("readout") is False and all(modes.values())
    m.eval()
    with torch.no_grad():
        assert torch.equal(c.inputs, m.encoder(x))  # no dropout applied during the capture
    assert c.inputs.grad_fn is None


def test_cell_in_a_python_loop_is_stacked():
    class Looped(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(4)
            self.enc, self.cell = nn.Linear(2, 3), nn.LSTMCell(3, 5)

        def forward(self, x, edit=False):
            h = (torch.full((x.shape[0], 5), 0.1), torch.zeros(x.shape[0], 5))
            for t in range(x.shape[1]):
                h = self.cell(self.enc(x[:, t]), h)
                if edit:
                    h = (h[0] * 0.5, h[1])
            return h[0]

    m, x = Looped(), torch.randn(3, 15, 2)
    c = capture(m, x)
    assert (c.name, c.calls, c.batch_first) == ("cell", 15, True)
    with torch.no_grad():
        hand = torch.stack([m.enc(x[:, t]) for t in range(15)], 1)  # what the loop feeds, step by step
    assert torch.equal(c.inputs, hand)
    h0 = (torch.full((3, 5), 0.1), torch.zeros(3, 5))
    _assert_same_spectra(
        rnnjac.spectra(c.module, c.inputs, c.h0, k=3, generator=_gen()),
        rnnjac.spectra(m.cell, hand, h0, k=3, generator=_gen()),
    )

    class Edited(Looped):
        def forward(self, x):
            return super().forward(x, edit=True)

    with pytest.raises(ValueError, match=r"called 15 times .* call 2 did not start from the state call 1 returned"):
        capture(Edited(), x)


def test_module_over_chunks_is_joined_and_other_repeats_refused():
    class Chunked(nn.Module):
        def __init__(self, carry=True):
            super().__init__()
            torch.manual_seed(5)
            self.rnn, self.carry = nn.RNN(2, 4), carry

        def forward(self, x):  # (T, B, 2) in two chunks
            out1, h = self.rnn(x[:6])
            out2, _ = self.rnn(x[6:], h if self.carry else None)
            return torch.cat([out1, out2])

    x = torch.randn(10, 2, 2)
    c = capture(Chunked(), x)
    assert c.calls == 2 and torch.equal(c.inputs, x)
    with pytest.raises(ValueError, match="not one recurrence"):
        capture(Chunked(carry=False), x)


def test_never_called_and_packed_are_refused():
    class Skips(nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = nn.GRU(2, 3)

        def forward(self, x):
            return x

    with pytest.raises(ValueError, match="never called"):
        capture(Skips(), torch.randn(4, 1, 2))

    class Packs(Skips):
        def forward(self, x):
            return self.gru(nn.utils.rnn.pack_padded_sequence(x, [4, 3], enforce_sorted=True))[0]

    with pytest.raises(ValueError, match="PackedSequence"):
        capture(Packs(), torch.randn(4, 2, 2))


def test_h0_given_replaces_the_models_and_resolve_passes_modules_through(caplog):
    m, x = EncoderGRU(), torch.randn(2, 8, 5)
    h0 = torch.randn(1, 2, 8)
    with caplog.at_level(logging.INFO, logger="rnnjac"):
        module, xs, got_h0, bf, attrs = resolve(m, x, h0)
    assert got_h0 is h0 and attrs == {"submodule": "gru"}
    assert "analysing submodule 'gru' (GRU(4, 8, batch_first=True))" in caplog.text
    x4 = x[..., :4]
    module, xs, got_h0, bf, attrs = resolve(m.gru, x4, h0)
    assert (module, xs, got_h0, bf, attrs) == (m.gru, x4, h0, None, {})  # the same objects
    assert [n for n, _ in recurrent_submodules(m.gru)] == [""]


def test_ignored_weights():
    keys = ["encoder.weight", "encoder.bias", "gru.weight_ih_l0", "gru.weight_hh_l0", "gru.bias_ih_l0", "readout.bias"]
    assert ignored_weights(keys, "gru.") == ["encoder.weight", "encoder.bias", "readout.bias"]
    root = ["weight_ih_l0", "weight_hh_l0", "weight_hr_l0", "bias_hh_l1", "weight_ih_l0_reverse", "readout.weight"]
    assert ignored_weights(root, "") == ["readout.weight"]
    assert ignored_weights(["cell.weight_ih", "cell.bias_hh"], "cell.") == []
    assert describe_ignored(["gru.weight_hh_l0"], "gru.") is None
    msg = describe_ignored([f"layer{i}.weight" for i in range(8)] + ["gru.weight_hh_l0"], "gru.", limit=3)
    assert msg.startswith(
        "the checkpoint holds weights besides the recurrent module's (layer0.weight, layer1.weight, layer2.weight, "
        "... (5 more)): the recurrent module is being fed --inputs directly; pass --model"
    )
