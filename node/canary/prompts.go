package canary

// The built-in canaries: everyday requests, so that a canary reads like a
// user's query. A liar that knows this list (it is public) could answer
// these honestly and lie otherwise; docs/security.md says so. Operators
// who want private canaries can build with their own list.
var chatPrompts = []string{
	"Explain in two sentences why the sky is blue.",
	"Write a haiku about autumn rain.",
	"What is the capital of Australia, and why is it not Sydney?",
	"Give me three tips for learning to play the guitar.",
	"Summarise the plot of Romeo and Juliet in one paragraph.",
	"How do I reverse a list in Python?",
	"What are the main differences between TCP and UDP?",
	"Suggest a name for a small bakery by the sea.",
	"Translate 'good morning, how are you?' into French and Spanish.",
	"Why do cats purr?",
	"List the planets of the solar system in order from the sun.",
	"What is a prime number? Give an example.",
	"Write a short thank-you note to a neighbour who watered my plants.",
	"How long should I boil an egg for a soft yolk?",
	"Explain what a hash function is to a ten-year-old.",
	"What causes the seasons on Earth?",
}

var embedInputs = []string{
	"The quick brown fox jumps over the lazy dog.",
	"A recipe for pancakes with blueberries and maple syrup.",
	"Quarterly revenue grew by eight percent year over year.",
	"How to replace a bicycle inner tube.",
	"The mitochondria is the powerhouse of the cell.",
	"Train delays expected due to maintenance work this weekend.",
	"Best hiking trails in the Alps for beginners.",
	"An introduction to linear algebra and vector spaces.",
}

var imagePrompts = []string{
	"a lighthouse on a rocky coast at sunset",
	"a red bicycle leaning against a brick wall",
	"a bowl of fresh fruit on a wooden table",
	"a snowy mountain village at night",
	"a cat sleeping on a windowsill",
	"an astronaut riding a horse, watercolour",
}
