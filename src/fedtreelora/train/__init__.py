"""Local training and evaluation of one client."""

from fedtreelora.train.batches import EncodedExamples, encode
from fedtreelora.train.client import ClientResult, run_client_round
from fedtreelora.train.evaluator import ClientEvaluator
from fedtreelora.train.metrics import evaluate_classifier
from fedtreelora.train.settings import GenerationSettings, LocalTraining, local_training
from fedtreelora.train.upload import UploadContext, UploadTransform, client_upload
from fedtreelora.train.vectorized import run_clients_round

__all__ = [
    "ClientEvaluator",
    "ClientResult",
    "EncodedExamples",
    "GenerationSettings",
    "LocalTraining",
    "UploadContext",
    "UploadTransform",
    "client_upload",
    "encode",
    "evaluate_classifier",
    "local_training",
    "run_client_round",
    "run_clients_round",
]
