"""transformers' common model tests (`ModelTesterMixin`, from its sdist) on tiny BERT, RoBERTa,
DistilBERT, GPT-2 and Llama.

This file is ours: the per-model files of transformers' repository are not in its sdist, so each
family gets a small tester here (tiny config, random ids, and an attention mask as a tokenizer
pads: a random length of real tokens a row, the padding after them, or before them for a decoder;
ids other than the pad id;
transformers' own testers' masks have gaps, which the cache never keys, so it would serve nothing). `bench.peer.run` copies it next to the sdist's `test_modeling_common.py`
and runs it twice, plain and with every model the tests build accelerated (`conftest.py`).
"""

from __future__ import annotations

import unittest

import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
    DistilBertConfig,
    DistilBertForMaskedLM,
    DistilBertForSequenceClassification,
    DistilBertModel,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Model,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaModel,
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaForSequenceClassification,
    RobertaModel,
)

from .test_modeling_common import ModelTesterMixin, ids_tensor


class TinyTester:
    """What `ModelTesterMixin` asks of a model tester: a config and the inputs for it."""

    def __init__(self, parent, config_class, types: bool = False, left: bool = False, **config):
        self.parent, self.config_class, self.types, self.left = parent, config_class, types, left
        self.batch_size, self.seq_length, self.vocab_size = 3, 7, 99
        self.hidden_size, self.num_hidden_layers, self.num_attention_heads = 32, 2, 4
        self.is_training = True
        self.config = config

    def get_config(self):
        return self.config_class(vocab_size=self.vocab_size, **self.config)

    def prepare_config_and_inputs_for_common(self):
        shape = [self.batch_size, self.seq_length]
        lengths = ids_tensor([self.batch_size, 1], self.seq_length) + 1  # 1..T real tokens a row
        at = torch.arange(self.seq_length, device=lengths.device)[None, :]
        mask = (at >= self.seq_length - lengths) if self.left else (at < lengths)
        ids, pad = ids_tensor(shape, self.vocab_size), self.config.get("pad_token_id")
        if pad is not None:  # (never the pad id, from which RoBERTa numbers positions: test_inputs_embeds_matches_input_ids
            ids = torch.where(ids == pad, (pad + 1) % self.vocab_size, ids)  # compares them to positions from embeddings)
        inputs = {"input_ids": ids, "attention_mask": mask.long()}
        if self.types:
            inputs["token_type_ids"] = ids_tensor(shape, 2)
        return self.get_config(), inputs


class BertPeerTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (BertModel, BertForMaskedLM, BertForSequenceClassification)

    def setUp(self):
        self.model_tester = TinyTester(self, BertConfig, types=True, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=37, max_position_embeddings=64,
                                   type_vocab_size=2)


class RobertaPeerTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (RobertaModel, RobertaForMaskedLM, RobertaForSequenceClassification)

    def setUp(self):  # (positions come from the ids: padding_idx 1)
        self.model_tester = TinyTester(self, RobertaConfig, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=37, max_position_embeddings=64, pad_token_id=1)


class DistilBertPeerTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (DistilBertModel, DistilBertForMaskedLM, DistilBertForSequenceClassification)

    def setUp(self):
        self.model_tester = TinyTester(self, DistilBertConfig, dim=32, n_layers=2, n_heads=4, hidden_dim=37,
                                       max_position_embeddings=64)


class GPT2PeerTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (GPT2Model, GPT2LMHeadModel)

    def setUp(self):
        self.model_tester = TinyTester(self, GPT2Config, left=True, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                   bos_token_id=98, eos_token_id=98, pad_token_id=98)


class LlamaPeerTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (LlamaModel, LlamaForCausalLM, LlamaForSequenceClassification)

    def setUp(self):
        self.model_tester = TinyTester(self, LlamaConfig, left=True, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=37, max_position_embeddings=64,
                                   pad_token_id=0)
