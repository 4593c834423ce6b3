"""Getting more out of a generative model without training it, on lmforge's own decoding loop.

``recipe`` (prompt components through the chat template, few-shot examples fixed or by
similarity), ``constrained`` (choice / regex / JSON schema by logit masking with a cached token
automaton), ``chains`` (YAML chains, cycle detection, every intermediate saved), ``reasoning``
(chain-of-thought, self-consistency, tree of thoughts), ``memory`` (full / window / summary chat
memory within a token budget), ``agent`` + ``tools`` (ReAct with a safe calculator, index search
and user functions).

    from lmforge.prompting import Constraint, generate_constrained, load_recipe, run_recipe
"""
from .agent import parse_step, run_agents
from .chains import load_chain, run_chain
from .constrained import Constraint, generate_constrained
from .memory import ChatMemory
from .reasoning import answer_questions, extract_answer, tree_of_thought
from .recipe import load_recipe, recipe_from_dict, run_recipe
from .tools import build_tools, calculate

__all__ = ["ChatMemory", "Constraint", "answer_questions", "build_tools", "calculate", "extract_answer",
           "generate_constrained", "load_chain", "load_recipe", "parse_step", "recipe_from_dict", "run_agents",
           "run_chain", "run_recipe", "tree_of_thought"]
