"""The embedded default model: a tiny random Llama with a real byte-level BPE tokenizer.

It is built offline and deterministically (fixed corpus, fixed seed) into the user cache the
first time it is needed, so pdserve runs and its tests pass without downloading anything. The
folder is an ordinary Hugging Face checkpoint that transformers can load as well.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

if TYPE_CHECKING:  # torch only to build the weights: finding the cached model (a sim front) imports none
    import torch

TINY_MODEL_NAME = "tiny-llama-v1"
DEFAULT_SEED = 1234
VOCAB_SIZE = 2000

BOS, EOS, IM_START, IM_END = "<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (BOS, EOS, IM_START, IM_END)

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}"
    "{{ '<|im_start|>system\\nYou may call these tools:\\n' }}"
    "{% for tool in tools %}{{ tool | tojson }}{{ '\\n' }}{% endfor %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] not in ('system', 'user', 'assistant', 'tool') %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

MODEL_SHAPE: dict[str, Any] = {
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
}

CORPUS = (
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    "Once upon a time, in a small village by the sea, there lived an old fisherman and his daughter.",
    "Every morning they walked down to the harbor, checked the nets, and counted the boats coming home.",
    "A good server answers every request quickly, keeps its promises, and never loses a single token.",
    "The weather today is cloudy with a chance of rain in the afternoon and clear skies at night.",
    "She opened the book, read the first page twice, and decided that the story was worth her time.",
    "Large language models predict the next token from the tokens that came before it.",
    "Prefill processes the whole prompt at once; decode produces one new token per step.",
    "Hello! How are you doing today? I am doing well, thank you for asking.",
    "What is the capital of France? The capital of France is Paris, a city on the river Seine.",
    "Water boils at one hundred degrees Celsius at sea level and freezes at zero degrees.",
    "The children played in the garden until the sun went down and their mother called them inside.",
    "Please write a short poem about the ocean, the moon, and the quiet sound of waves at night.",
    "In the beginning the computer was as large as a room, and now it fits inside a pocket.",
    "He said that he would come back tomorrow, but nobody believed him, not even his brother.",
    "Numbers like 1, 2, 3, 42, 100, 2024 and 3.14159 appear in many kinds of text.",
    "The train leaves the station at seven o'clock and arrives in the city two hours later.",
    "Cats sleep for most of the day, while dogs prefer to run, play, and bark at the mailman.",
    "Bread is made from flour, water, salt, and yeast, baked in a hot oven until it turns golden.",
    "The library was quiet except for the soft rustle of pages and the ticking of an old clock.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)\n",
    "Science is a way of thinking as much as it is a body of knowledge about the natural world.",
    "A journey of a thousand miles begins with a single step, as the old saying goes.",
    "The mountains were covered in snow, and the valley below was green with spring grass.",
    "They built a small wooden boat, painted it blue, and named it after their grandmother.",
    "When the music started, everyone stood up and began to dance in the middle of the hall.",
    "The teacher asked the students to explain their answers and to show every step of the work.",
    "Good morning! Would you like some coffee, tea, or a glass of fresh orange juice?",
    "The river flows from the hills to the sea, carrying stones, leaves, and stories along the way.",
    "Our team finished the project on time because everyone helped each other when it was hard.",
    "If you want to learn something well, practice it a little every day and be patient.",
    "The old bridge creaked under the weight of the cart, but it held, as it had for a hundred years.",
    "Stars are distant suns, and some of them have planets of their own circling around them.",
    "The market was full of people buying apples, oranges, cheese, fish, and fresh vegetables.",
    "Thank you for your message. I will read it carefully and reply as soon as I can.",
    "The robot looked at the map, turned left at the corner, and rolled slowly toward the door.",
    "Each request carries a prompt, a list of sampling parameters, and a limit on new tokens.",
    "The cache stores keys and values in pages, so memory can be shared and reused efficiently.",
    "After the storm, the sky turned orange and pink, and the birds began to sing again.",
    "My favorite foods are rice, noodles, soup, and warm bread with butter and honey.",
    "The doctor listened to his heart, wrote a note, and told him to rest for a few days.",
    "Some people like to wake up early, while others work best late at night.",
    "The small shop on the corner sells books, maps, pens, paper, and postcards from far away.",
    "Questions are the beginning of wisdom; answers are only the places where we pause.",
    "The engine started with a roar, and the little airplane lifted gently into the blue sky.",
    "Write the answer in one sentence. Then explain why it is correct in two more sentences.",
    "Friends are the people who stay when the weather turns cold and the road gets long.",
    "The garden had roses, tulips, sunflowers, and a tall tree that gave shade in summer.",
    "A café in the old town serves crème brûlée, and the naïve tourist orders three of them.",
    "The user asked a question, and the assistant gave a helpful, honest, and short answer.",
    "System: you are a helpful assistant. User: tell me a joke. Assistant: why did the chicken cross the road?",
    "It was the best of times, it was the worst of times, it was a season of light and of darkness.",
    "To be or not to be, that is the question the actor asked the empty theater every evening.",
    "The price of the ticket is twelve dollars and fifty cents, paid in cash or by card.",
    "Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, and Sunday make up the week.",
    "January, February, March, April, May, June, July, August, September, October, November, December.",
    "Red, orange, yellow, green, blue, indigo, and violet are the colors of the rainbow.",
    "One, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve.",
    "Photosynthesis lets plants turn sunlight, carbon dioxide, and water into sugar and oxygen.",
    "The orchestra tuned their violins, cellos, flutes, trumpets, and drums before the concert began.",
    "Volcanoes erupt when melted rock, called magma, pushes up through cracks in the earth's crust.",
    "Our neighbors adopted a puppy named Biscuit who chews shoes, socks, cushions, and newspapers.",
    "Mathematics studies patterns: triangles, circles, equations, probabilities, and infinite sequences.",
    "The museum exhibition featured ancient pottery, bronze statues, jewelry, and handwritten manuscripts.",
    "Astronauts aboard the station exercise daily because weightlessness weakens muscles and bones.",
    "Grandfather repaired bicycles in his workshop, whistling while he adjusted chains and brakes.",
    "Hurricanes gather strength over warm tropical oceans and weaken quickly after reaching land.",
    "The detective examined fingerprints, footprints, receipts, and a mysterious torn photograph.",
    "Chocolate chip cookies require butter, sugar, eggs, vanilla, flour, baking soda, and patience.",
    "Penguins waddle across Antarctic ice, dive for krill, and huddle together against freezing wind.",
    "Electricity travels through copper wires, powering lamps, refrigerators, televisions, and phones.",
    "Historians debate whether empires collapse because of economics, warfare, disease, or climate.",
    "The gardener pruned hedges, planted carrots and cabbages, and scattered seeds for wildflowers.",
    "Compilers translate source code into machine instructions that processors execute directly.",
    "Tokenizers split sentences into subword units; vocabularies usually contain thousands of entries.",
    "Schedulers batch waiting requests, allocate memory pages, and preempt work when capacity runs out.",
    "Elephants remember familiar voices, mourn their companions, and communicate with low rumbles.",
    "The lighthouse keeper polished lenses, recorded storms in a logbook, and rescued stranded sailors.",
    "Marathon runners hydrate frequently, pace themselves carefully, and celebrate crossing the finish.",
    "Bees pollinate blossoms in orchards, producing honey, wax, and bigger harvests of fruit.",
    "Architects sketch blueprints, calculate loads, and choose materials like steel, glass, and timber.",
    "The chemistry laboratory smelled of vinegar, ammonia, and burnt matches after the experiment.",
    "Submarines navigate underwater using sonar, periscopes, ballast tanks, and precise gyroscopes.",
    "Autumn leaves drift across sidewalks in shades of crimson, amber, copper, and faded gold.",
    "Translators carefully preserve meaning, rhythm, humor, and nuance when converting literature.",
    "Kangaroos hop across Australian grasslands, carrying joeys safely inside their pouches.",
    "The blacksmith heated iron until it glowed, then hammered it into horseshoes and knives.",
    "Databases index records so queries can filter, sort, join, and aggregate millions of rows.",
    "Hikers packed flashlights, blankets, sandwiches, compasses, and extra batteries for the expedition.",
    "Dolphins whistle, click, and leap; scientists believe they recognize individual companions.",
    "Parliament adjourned after lengthy arguments about taxation, healthcare, and infrastructure budgets.",
    "Mushrooms sprout overnight after rainfall, feeding on decaying logs beneath the forest canopy.",
    "Glaciers carve valleys slowly, grinding boulders into gravel and depositing fertile sediment.",
    "Quantum computers manipulate qubits, exploiting superposition and entanglement for calculations.",
    "The carpenter measured twice, sawed once, sanded edges smooth, and varnished the wooden cabinet.",
    "Jazz musicians improvise melodies, trading solos while the bassist keeps a steady groove.",
    "Vaccines train immune systems to recognize viruses, preventing serious illness and epidemics.",
    "Owls hunt silently at midnight, swooping down on mice, voles, beetles, and unsuspecting rabbits.",
    "The quick answer is yes, but the longer answer depends on what you mean by the question.",
)


def default_cache_dir() -> Path:
    """``$PDSERVE_CACHE_DIR``, else ``$XDG_CACHE_HOME/pdserve``, else ``~/.cache/pdserve``."""
    if os.environ.get("PDSERVE_CACHE_DIR"):
        return Path(os.environ["PDSERVE_CACHE_DIR"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "pdserve"
    return Path.home() / ".cache" / "pdserve"


def default_model_path() -> str:
    """Folder of the embedded tiny model, built once into the cache (atomically, race-safe)."""
    final = default_cache_dir() / TINY_MODEL_NAME
    if (final / "model.safetensors").is_file():
        return str(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{TINY_MODEL_NAME}.", dir=final.parent))
    try:
        build_tiny_checkpoint(tmp)
        tmp.chmod(0o755)
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(final)


@contextmanager
def _serial_tokenizers():
    """Train without rayon threads so the merges cannot depend on scheduling."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def train_tokenizer(vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """A byte-level BPE tokenizer (GPT-2/Llama-3 style) trained on :data:`CORPUS`."""
    tok = Tokenizer(BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    with _serial_tokenizers():
        tok.train_from_iterator(CORPUS, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1", special_tokens=[(BOS, bos_id)]
        ),
    ])
    return tok


def _init_weights(config: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """Random float32 weights with HF parameter names; std 0.08 (0.3 for lm_head) keeps logits peaked."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = hidden // config["num_attention_heads"]
    q_out, kv_out = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim

    def normal(*shape: int, std: float = 0.08) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float32) * std

    vocab = config["vocab_size"]
    tensors = {"model.embed_tokens.weight": normal(vocab, hidden, std=1.0)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors[p + "self_attn.q_proj.weight"] = normal(q_out, hidden)
        tensors[p + "self_attn.k_proj.weight"] = normal(kv_out, hidden)
        tensors[p + "self_attn.v_proj.weight"] = normal(kv_out, hidden)
        tensors[p + "self_attn.o_proj.weight"] = normal(hidden, q_out)
        tensors[p + "mlp.gate_proj.weight"] = normal(inter, hidden)
        tensors[p + "mlp.up_proj.weight"] = normal(inter, hidden)
        tensors[p + "mlp.down_proj.weight"] = normal(hidden, inter)
        tensors[p + "input_layernorm.weight"] = torch.ones(hidden)
        tensors[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
    tensors["model.norm.weight"] = torch.ones(hidden)
    tensors["lm_head.weight"] = normal(vocab, hidden, std=0.3)
    return tensors


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def build_tiny_checkpoint(out_dir: str | Path, seed: int = DEFAULT_SEED) -> Path:
    """Write the tiny model (config, generation config, tokenizer, weights) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer()
    tok.save(str(out / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    vocab = tok.get_vocab_size(with_added_tokens=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **MODEL_SHAPE,
        "head_dim": MODEL_SHAPE["hidden_size"] // MODEL_SHAPE["num_attention_heads"],
        "vocab_size": vocab,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "bos_token_id": ids[BOS],
        "eos_token_id": ids[EOS],
        "pad_token_id": ids[EOS],
    }
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", {
        "bos_token_id": ids[BOS],
        "eos_token_id": [ids[EOS], ids[IM_END]],
        "pad_token_id": ids[EOS],
    })
    added = {
        str(ids[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True}
        for t in SPECIAL_TOKENS
    }
    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_SHAPE["max_position_embeddings"],
        "chat_template": CHAT_TEMPLATE,
    })
    _write_json(out / "special_tokens_map.json", {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS})
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    from safetensors.torch import save_file

    save_file(_init_weights(config, seed), str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
